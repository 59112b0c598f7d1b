"""The runtime on the in-memory transport: per-key order, backpressure, retries,
dead-lettering after the last attempt, graceful shutdown."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

from nervus import Context, Event, Service, Settings
from nervus.runtime import DeliveryInfo
from nervus.transports import Delivery, dead_letter_channel, from_url

pytestmark = pytest.mark.unit


class StepDone(Event, type="flow.step.done.v1", key="job"):
    job: str
    n: int


class Ping(Event, type="flow.ping.sent.v1"):
    n: int


UrlFactory = Callable[..., str]


@pytest.fixture(params=["memory", "sqlite"])
def make_url(request: pytest.FixtureRequest, tmp_path: Path) -> UrlFactory:
    """Builds URLs of a fresh log on each transport the runtime is tested on."""

    def make(partitions: int = 4) -> str:
        name = uuid.uuid4().hex
        if request.param == "memory":
            return f"memory://{name}?partitions={partitions}"
        return f"sqlite:///{tmp_path}/{name}.db?partitions={partitions}&synchronous=off"

    return make


def settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "transport": url,
        "backoff_initial": 0.01,
        "backoff_max": 0.02,
        "backoff_jitter": 0.0,
        "shutdown_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll state that other tasks change, failing after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.005)


async def drain(url: str, channel: str, group: str, poll: float = 0.1) -> list[Delivery]:
    """What ``group`` still has to read on ``channel`` (acking it)."""
    transport = from_url(url)
    await transport.connect()
    try:
        sub = await transport.subscribe([channel], group)
        got: list[Delivery] = []
        while batch := await sub.fetch(1000, poll):
            got.extend(batch)
        await sub.ack(got)
        return got
    finally:
        await transport.close()


async def test_strict_order_per_key_with_keys_in_parallel(make_url: UrlFactory) -> None:
    url = make_url(partitions=1)  # every key on one partition
    svc = Service("jobs", settings=settings(url, max_in_flight=64))
    rand = random.Random(11)
    seen: dict[str, list[int]] = defaultdict(list)
    running: dict[str, int] = defaultdict(int)
    overlap = {"keys": 0, "same_key": 0}
    total = 0

    @svc.on(StepDone)
    async def step(event: StepDone, ctx: Context) -> None:
        nonlocal total
        running[event.job] += 1
        overlap["same_key"] = max(overlap["same_key"], running[event.job])
        overlap["keys"] = max(overlap["keys"], sum(1 for v in running.values() if v))
        for _ in range(rand.randint(0, 3)):
            await asyncio.sleep(0)
        seen[event.job].append(event.n)
        running[event.job] -= 1
        total += 1

    jobs = [f"job-{i}" for i in range(8)]
    events = [StepDone(job=jobs[rand.randrange(8)], n=n) for n in range(400)]
    async with svc:
        await svc.publish_many(events)
        await wait_for(lambda: total == 400)
    for job in jobs:
        assert seen[job] == [e.n for e in events if e.job == job]
    assert overlap["same_key"] == 1
    assert overlap["keys"] > 1


async def test_in_flight_never_exceeds_the_bound(make_url: UrlFactory) -> None:
    url = make_url()
    bound = 5
    svc = Service("slow", settings=settings(url, max_in_flight=bound))
    concurrent = 0
    peak = 0
    done = 0

    @svc.on(Ping)
    async def slow(event: Ping, ctx: Context) -> None:
        nonlocal concurrent, peak, done
        concurrent += 1
        peak = max(peak, concurrent)
        await asyncio.sleep(0.002)
        concurrent -= 1
        done += 1

    async with svc:
        await svc.publish_many([Ping(n=n) for n in range(bound * 10)])
        (consumer,) = svc.consumers
        await wait_for(lambda: done == bound * 10)
        assert consumer.peak_in_flight <= bound
        assert consumer.in_flight == 0 or done == bound * 10
    assert peak <= bound
    assert peak > 1  # keyless events do run in parallel


async def test_backpressure_stops_fetching_while_full(make_url: UrlFactory) -> None:
    url = make_url()
    svc = Service("gated", settings=settings(url, max_in_flight=3))
    gate = asyncio.Event()
    started = 0

    @svc.on(Ping)
    async def held(event: Ping, ctx: Context) -> None:
        nonlocal started
        started += 1
        await gate.wait()

    async with svc:
        await svc.publish_many([Ping(n=n) for n in range(30)])
        (consumer,) = svc.consumers
        await wait_for(lambda: started == 3)
        await asyncio.sleep(0.05)
        assert started == 3
        assert consumer.in_flight == 3  # nothing more was fetched
        gate.set()
        await wait_for(lambda: started == 30)
    assert consumer.peak_in_flight <= 3


async def test_immediate_retries_run_in_process_without_redelivery(make_url: UrlFactory) -> None:
    url = make_url()
    svc = Service("flaky", settings=settings(url, immediate_retries=2, max_attempts=1))
    deliveries: list[DeliveryInfo] = []

    @svc.on(Ping)
    async def flaky(event: Ping, ctx: Context) -> None:
        deliveries.append(ctx.delivery)
        if len(deliveries) < 3:
            raise RuntimeError("not yet")

    async with svc:
        await svc.publish(Ping(n=1))
        await wait_for(lambda: len(deliveries) == 3)
        await asyncio.sleep(0.05)
    assert [d.attempt for d in deliveries] == [1, 1, 1]
    assert await drain(url, dead_letter_channel("flow.ping", "flaky"), "inspect") == []


async def test_failed_deliveries_are_redelivered_with_backoff_then_succeed(
    make_url: UrlFactory,
) -> None:
    url = make_url()
    svc = Service("flaky", settings=settings(url, immediate_retries=0, max_attempts=5))
    attempts: list[int] = []

    @svc.on(Ping)
    async def flaky(event: Ping, ctx: Context) -> None:
        attempts.append(ctx.delivery.attempt)
        if ctx.delivery.attempt < 3:
            raise RuntimeError(f"attempt {ctx.delivery.attempt} fails")

    async with svc:
        await svc.publish(Ping(n=1))
        await wait_for(lambda: attempts[-1:] == [3])
        await asyncio.sleep(0.05)
    assert attempts == [1, 2, 3]
    assert await drain(url, "flow.ping", "flaky") == []  # settled and committed


async def test_dead_lettered_after_the_last_attempt_with_the_reason(make_url: UrlFactory) -> None:
    url = make_url()
    svc = Service("broken", settings=settings(url, immediate_retries=1, max_attempts=3))
    runs: list[int] = []

    class CardDeclined(Exception):
        pass

    @svc.on(StepDone)
    async def broken(event: StepDone, ctx: Context) -> None:
        runs.append(ctx.delivery.attempt)
        await ctx.publish(Ping(n=event.n))  # staged, never published
        raise CardDeclined(f"declined {event.n}")

    dlq = dead_letter_channel("flow.step", "broken")
    async with svc:
        await svc.publish(StepDone(job="j", n=42))
        await svc.publish(StepDone(job="other", n=1))
        # >=: at-least-once allows a loaded machine an extra delivery (a lease lost)
        await wait_for(lambda: len(runs) >= 12, within=20.0)
        dead: list[Delivery] = []
        async with asyncio.timeout(20):
            while len(dead) < 2:
                dead += await drain(url, dlq, "inspect-dlq", poll=0.05)
    counted = collections.Counter(runs)
    assert set(counted) == {1, 2, 3} and all(counted[a] >= 4 for a in (1, 2, 3)), runs
    by_n = {d.headers["nervus_dlq_message"].rsplit(" ", 1)[-1].rstrip("')"): d for d in dead}
    d = by_n["42"]
    assert d.headers["nervus_dlq_reason"] == "handler-failed"
    assert d.headers["nervus_dlq_attempts"] == "3"
    assert d.headers["nervus_dlq_error_type"].endswith("CardDeclined")
    assert "CardDeclined: declined 42" in d.headers["nervus_dlq_traceback"]
    assert ".<locals>.broken: CardDeclined('declined 42')" in d.headers["nervus_dlq_message"]
    assert d.headers["nervus_dlq_channel"] == "flow.step"
    assert d.headers["nervus_dlq_offset"] == "0"
    assert d.key == "j"
    assert await drain(url, "flow.ping", "anyone") == []  # failed runs published nothing
    assert await drain(url, "flow.step", "broken") == []  # the originals were settled


async def test_shutdown_finishes_in_flight_work_and_acks_it(make_url: UrlFactory) -> None:
    url = make_url()
    svc = Service("graceful", settings=settings(url, max_in_flight=10, shutdown_timeout=5.0))
    release = asyncio.Event()
    started = 0
    finished = 0

    @svc.on(Ping)
    async def work(event: Ping, ctx: Context) -> None:
        nonlocal started, finished
        started += 1
        await release.wait()
        finished += 1

    await svc.start()
    await svc.publish_many([Ping(n=n) for n in range(4)])
    await wait_for(lambda: started == 4)
    stopping = asyncio.create_task(svc.stop())
    await asyncio.sleep(0.02)
    assert not stopping.done()  # waiting for the in-flight handlers
    await svc.publish(Ping(n=99))  # the transport is still open while draining
    release.set()
    async with asyncio.timeout(5):
        await stopping
    assert (started, finished) == (4, 4)
    assert svc.state == "closed"
    left = await drain(url, "flow.ping", "graceful")
    assert [int(d.body.split(b":")[1].rstrip(b"}")) for d in left] == [99]


async def test_work_unfinished_at_the_deadline_is_left_for_redelivery(
    make_url: UrlFactory, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_url()
    svc = Service("stuck", settings=settings(url, shutdown_timeout=0.05))
    started = 0
    cancelled = 0

    @svc.on(Ping)
    async def stuck(event: Ping, ctx: Context) -> None:
        nonlocal started, cancelled
        started += 1
        if event.n == 0:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled += 1
                raise

    await svc.start()
    await svc.publish_many([Ping(n=0), Ping(n=1), Ping(n=2)])
    await wait_for(lambda: started == 3)
    async with asyncio.timeout(5):
        await svc.stop()
    assert cancelled == 1
    assert "1 deliveries were not finished within the shutdown timeout" in caplog.text
    left = await drain(url, "flow.ping", "stuck")
    assert [d.body for d in left] == [b'{"n":0}']


async def test_run_stops_gracefully_on_sigterm(make_url: UrlFactory) -> None:
    url = make_url()
    svc = Service("signalled", settings=settings(url))
    handled: list[int] = []

    @svc.on(Ping)
    async def handle(event: Ping, ctx: Context) -> None:
        handled.append(event.n)

    runner = asyncio.create_task(svc.run())
    await wait_for(lambda: svc.state == "running")
    await svc.publish(Ping(n=1))
    await wait_for(lambda: handled == [1])
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(5):
        await runner  # returns normally
    assert svc.state == "closed"
    assert await drain(url, "flow.ping", "signalled") == []


async def test_positions_are_committed_only_up_to_the_lowest_unfinished(
    make_url: UrlFactory,
) -> None:
    url = make_url(partitions=1)
    svc = Service("ordered", settings=settings(url, shutdown_timeout=0.05))
    finished: list[str] = []

    @svc.on(StepDone)
    async def work(event: StepDone, ctx: Context) -> None:
        if event.job == "slow":
            await asyncio.Event().wait()  # never finishes: cancelled at the deadline
        finished.append(event.job)

    await svc.start()
    await svc.publish_many([StepDone(job=j, n=0) for j in ("slow", "a", "b")])
    await wait_for(lambda: finished == ["a", "b"])
    async with asyncio.timeout(5):
        await svc.stop()
    # "a" and "b" were acked, but the log's position cannot pass "slow" at offset 0:
    # the next member of the group is handed all three again.
    left = await drain(url, "flow.step", "ordered")
    assert [(d.offset, d.key) for d in left] == [(0, "slow"), (1, "a"), (2, "b")]
