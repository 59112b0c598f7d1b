"""The Redis transport through a restart of its server: while Redis is down,
``publish`` fails at once with ``TransportUnavailable`` naming the server, ``fetch``
fails the same way (the runtime retries it with backoff) and the transport logs
one warning for the whole outage; once Redis is back the same transport and
subscription publish and consume again, and nothing acknowledged comes back.

The server is stopped and started with ``scripts/services down|up redis``, which
runs it without persistence: a restart empties it, so the transport must also
recreate the consumer groups it finds missing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from nervus import Context, Event, Service, Settings
from nervus.errors import TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Subscription, from_url
from nervus.transports.redis import RedisTransport

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "scripts" / "services"
LOCAL_URL = "redis://127.0.0.1:6379/0"
LOGGER = "nervus.transports.redis"


class RestartPinged(Event, type="test.redis-restart.pinged.v1", key="ping_id"):
    ping_id: str


async def services(action: str) -> None:
    """``scripts/services ACTION redis``, failing the test if it does not succeed."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(SERVICES),
        action,
        "redis",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        # the script waits its turn when other servers are being started or stopped
        async with asyncio.timeout(180):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, f"services {action} redis: {output.decode()}"


@pytest.fixture
def local_redis(redis_url: str) -> Iterator[str]:
    """The URL of the Redis server ``scripts/services`` runs, which these tests stop
    and start; it is left running whatever happens."""
    if redis_url.split("?")[0] != LOCAL_URL:
        pytest.skip(f"restart tests need the local server {LOCAL_URL}, not {redis_url}")
    yield redis_url
    # a test brings the server back itself; this catches a test that was cancelled
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        subprocess.run(["bash", str(SERVICES), "up", "redis"], check=True, timeout=180)


@pytest.fixture
async def prefix(local_redis: str) -> AsyncIterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    name = f"nervus-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = aioredis.Redis.from_url(local_redis)
    try:
        keys = [key async for key in client.scan_iter(match=f"{name}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def url_of(redis_url: str, prefix: str) -> str:
    options = {
        "prefix": prefix,
        "partitions": 2,
        "lease_seconds": 1.5,
        "heartbeat_seconds": 0.25,
        "block_seconds": 0.1,
        "commit_interval": 0.01,
        "connect_timeout": 2,
        "command_timeout": 6,
    }
    return f"{redis_url}?{'&'.join(f'{k}={v}' for k, v in options.items())}"


def messages(label: str, count: int) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(key=f"{label}-{i}", headers={"ce_id": f"{label}-{i}"}, body=b"x")
        for i in range(count)
    ]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.WARNING and "unreachable" in r.getMessage()
    ]


async def take(sub: Subscription, want: set[str], *, ack: bool = True) -> list[Delivery]:
    """Fetch until every id in ``want`` came (bounded); fetch errors of an outage are
    retried as the runtime does."""
    got: list[Delivery] = []
    async with asyncio.timeout(20):
        while not want <= {d.headers["ce_id"] for d in got}:
            try:
                batch = await sub.fetch(100, 0.2)
            except TransportUnavailable:
                await asyncio.sleep(0.1)
                continue
            got.extend(batch)
            if ack and batch:
                await sub.ack(batch)
    return got


async def test_publisher_and_consumer_resume_after_the_server_restarts(
    local_redis: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    transport = from_url(url_of(local_redis, prefix))
    assert isinstance(transport, RedisTransport)
    await transport.connect()
    try:
        sub = await transport.subscribe(["orders"], "billing")
        first = messages("first", 12)
        # concurrent calls leave several connections in the client's pool
        await asyncio.gather(*(transport.publish("orders", first[i::4]) for i in range(4)))
        acked = await take(sub, {m.headers["ce_id"] for m in first})
        # two more, fetched and still unsettled when the server goes away
        await transport.publish("orders", messages("pending", 2))
        pending = await take(sub, {"pending-0", "pending-1"}, ack=False)
        await asyncio.sleep(0.1)  # the acknowledgements are sent in batches

        await services("down")
        try:
            for _ in range(3):
                with pytest.raises(TransportUnavailable) as caught:
                    async with asyncio.timeout(10):
                        await transport.publish("orders", messages("lost", 1))
                assert LOCAL_URL in str(caught.value)
            failures: list[str] = []
            for _ in range(10):
                try:
                    async with asyncio.timeout(10):
                        assert await sub.fetch(10, 0.1) == []
                except TransportUnavailable as exc:
                    failures.append(str(exc))
            assert failures, "a fetch while the server is down says so"
            assert all(LOCAL_URL in f for f in failures), failures
            await sub.ack(pending)  # settled during the outage, sent once it is back
            await asyncio.sleep(2.0)  # longer than the lease: heartbeats fail meanwhile
            logged = warnings_of(caplog)
            assert len(logged) == 1, f"one warning per outage, got {logged}"
            assert LOCAL_URL in logged[0]
        finally:
            await services("up")

        # every call succeeds at once, on whichever pooled connection it gets
        second = messages("second", 12)
        async with asyncio.timeout(10):
            await asyncio.gather(*(transport.publish("orders", second[i::4]) for i in range(4)))
        again = await take(sub, {m.headers["ce_id"] for m in second})
        assert not {d.headers["ce_id"] for d in again} & {d.headers["ce_id"] for d in acked}, (
            "a message acknowledged before the outage came back"
        )
        assert not [d for d in again if d.headers["ce_id"].startswith("lost")]
        assert await sub.fetch(10, 0.3) == []
        assert len(warnings_of(caplog)) == 1
        assert any(r.name == LOGGER and "reachable again" in r.getMessage() for r in caplog.records)
    finally:
        await transport.close()


async def test_a_service_handles_every_event_through_a_restart(
    local_redis: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings = Settings(
        transport=url_of(local_redis, prefix),
        backoff_initial=0.05,
        backoff_max=0.5,
        publish_timeout=300.0,  # longer than scripts/services may wait for its turn
    )
    svc = Service("restart-redis", settings=settings)
    handled: dict[str, int] = {}
    started: set[str] = set()
    release = asyncio.Event()

    @svc.on(RestartPinged)
    async def handle(event: RestartPinged, ctx: Context) -> None:
        started.add(event.ping_id)
        if event.ping_id.startswith("before"):
            await release.wait()  # still in flight when the server goes away
        handled[event.ping_id] = handled.get(event.ping_id, 0) + 1

    async with svc:
        before = [f"before-{i}" for i in range(5)]
        for ping_id in before:
            await svc.publish(RestartPinged(ping_id=ping_id))
        async with asyncio.timeout(10):
            while not set(before) <= started:
                await asyncio.sleep(0.02)

        await services("down")
        try:
            during = asyncio.create_task(svc.publish(RestartPinged(ping_id="during")))
            async with asyncio.timeout(10):
                while svc.health().healthy:
                    await asyncio.sleep(0.05)
            release.set()
            await asyncio.sleep(0.5)
            assert not during.done(), "a publish retries while the server is down"
        finally:
            await services("up")

        async with asyncio.timeout(30):
            await during
        after = [f"after-{i}" for i in range(5)]
        for ping_id in after:
            await svc.publish(RestartPinged(ping_id=ping_id))
        expected = {*before, "during", *after}
        async with asyncio.timeout(20):
            while not expected <= handled.keys():
                await asyncio.sleep(0.05)
        async with asyncio.timeout(20):
            while not svc.health().healthy:
                await asyncio.sleep(0.05)
        assert svc.state == "running"
        assert set(handled) == expected
    assert len(warnings_of(caplog)) == 1, "the transport warns once per outage"
