"""The Kafka transport through a restart of its broker: while Kafka is down,
``publish`` keeps the batch and retries it, failing with ``TransportUnavailable``
naming the URL only once ``delivery_timeout`` has passed; ``fetch`` keeps its time
bound and returns nothing; each transport logs one warning for the whole outage.
Once Kafka is back the same transport and subscription publish and consume again,
a publish begun during the outage completes, nothing acknowledged comes back, and
a running ``Service`` handles every event.

The broker is stopped and started with ``scripts/services down|up kafka``; it keeps
its data (topics, committed positions) across the restart. A Kafka restart takes
many seconds, so this file restarts it once, for the transport and the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from nervus import Context, Event, Service, Settings
from nervus.errors import TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Subscription, from_url
from nervus.transports.kafka import KafkaTransport

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "scripts" / "services"
LOCAL_URL = "kafka://127.0.0.1:9092"
LOGGER = "nervus.transports.kafka"
RUN = uuid.uuid4().hex[:8]
FAST = "partitions=2&session_timeout=6&heartbeat_interval=0.5&linger_ms=1&commit_interval=0.02"


class KafkaRestartPinged(
    Event, type="test.kafka-restart.pinged.v1", channel=f"nervus-kafka-restart-{RUN}-pings"
):
    ping_id: str


async def services(action: str) -> None:
    """``scripts/services ACTION kafka``, failing the test if it does not succeed."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(SERVICES),
        action,
        "kafka",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(90):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, f"services {action} kafka: {output.decode()}"


@pytest.fixture
def local_kafka(kafka_url: str) -> Iterator[str]:
    """The URL of the broker ``scripts/services`` runs, which this test stops and
    starts; it is left running, and the topics of this run deleted, whatever happens."""
    if kafka_url.split("?")[0] != LOCAL_URL:
        pytest.skip(f"restart tests need the local broker {LOCAL_URL}, not {kafka_url}")
    yield kafka_url
    # the test brings the broker back itself; this catches a test that was cancelled
    subprocess.run(["bash", str(SERVICES), "up", "kafka"], check=True, timeout=120)
    admin = AdminClient({"bootstrap.servers": "127.0.0.1:9092"})
    with contextlib.suppress(KafkaException):  # best effort: retention removes the rest
        topics = [t for t in admin.list_topics(timeout=10).topics if RUN in t]
        if topics:
            for future in admin.delete_topics(topics, operation_timeout=30).values():
                future.result()


@pytest.fixture
async def transports(local_kafka: str) -> AsyncIterator[tuple[KafkaTransport, KafkaTransport]]:
    """Two transports: one that waits long for a publish to be acknowledged, one that
    gives up after two seconds."""
    patient = from_url(f"{local_kafka}?{FAST}&delivery_timeout=60")
    hasty = from_url(f"{local_kafka}?{FAST}&delivery_timeout=2")
    assert isinstance(patient, KafkaTransport) and isinstance(hasty, KafkaTransport)
    await patient.connect()
    await hasty.connect()
    try:
        yield patient, hasty
    finally:
        await hasty.close()
        await patient.close()


def messages(label: str, count: int) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(key=f"{label}-{i}", headers={"ce_id": f"{label}-{i}"}, body=b"x")
        for i in range(count)
    ]


def warnings_of(caplog: pytest.LogCaptureFixture, url: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER
        and r.levelno >= logging.WARNING
        and f"Kafka at {url} is unreachable" in r.getMessage()
    ]


async def take(sub: Subscription, want: set[str], *, ack: bool = True) -> list[Delivery]:
    """Fetch until every id in ``want`` came (bounded); fetch errors of an outage are
    retried as the runtime does."""
    got: list[Delivery] = []
    async with asyncio.timeout(45):
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


async def committed_past(group: str, deliveries: list[Delivery]) -> None:
    """Wait until ``group``'s committed positions are past every one of ``deliveries``."""
    needed: dict[tuple[str, int], int] = {}
    for d in deliveries:
        key = (d.channel, d.partition)
        needed[key] = max(needed.get(key, 0), d.offset + 1)
    reader = Consumer({"bootstrap.servers": "127.0.0.1:9092", "group.id": group})
    try:
        async with asyncio.timeout(10):
            while True:
                found = await asyncio.to_thread(
                    reader.committed, [TopicPartition(t, p) for t, p in needed], 5
                )
                if all(tp.offset >= needed[(tp.topic, tp.partition)] for tp in found):
                    return
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(reader.close)


async def test_publishers_and_consumers_resume_after_the_broker_restarts(
    transports: tuple[KafkaTransport, KafkaTransport], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    patient, hasty = transports
    channel, group = f"nervus-kafka-restart-{RUN}-orders", f"nervus-kafka-restart-{RUN}-billing"
    sub = await patient.subscribe([channel], group)
    await hasty.ensure_channel(channel)

    # a service on the same broker, with events still being handled at the outage
    svc = Service(
        f"kafka-restart-{RUN}",
        settings=Settings(
            transport=f"{LOCAL_URL}?{FAST}&delivery_timeout=60&client_id=nervus-restart-service",
            backoff_initial=0.05,
            backoff_max=0.5,
            publish_timeout=60.0,
        ),
    )
    handled: dict[str, int] = {}
    started: set[str] = set()
    release = asyncio.Event()

    @svc.on(KafkaRestartPinged)
    async def handle(event: KafkaRestartPinged, ctx: Context) -> None:
        started.add(event.ping_id)
        if event.ping_id.startswith("before"):
            await release.wait()  # still in flight when the broker goes away
        handled[event.ping_id] = handled.get(event.ping_id, 0) + 1

    async with svc:
        first = messages("first", 10)
        await patient.publish(channel, first)
        acked = await take(sub, {m.headers["ce_id"] for m in first})
        # two more, fetched and still unsettled when the broker goes away
        await patient.publish(channel, messages("pending", 2))
        pending = await take(sub, {"pending-0", "pending-1"}, ack=False)
        await committed_past(group, acked)

        before = [f"before-{i}" for i in range(5)]
        for ping_id in before:
            await svc.publish(KafkaRestartPinged(ping_id=ping_id))
        async with asyncio.timeout(30):
            while not set(before) <= started:
                await asyncio.sleep(0.02)

        await services("down")
        try:
            # the patient transport keeps a batch published now and retries it
            during = asyncio.create_task(patient.publish(channel, messages("during", 3)))
            svc_during = asyncio.create_task(svc.publish(KafkaRestartPinged(ping_id="during")))
            # the hasty one gives up after its delivery_timeout, naming the broker
            with pytest.raises(TransportUnavailable) as caught:
                async with asyncio.timeout(20):
                    await hasty.publish(channel, messages("lost", 1))
            assert LOCAL_URL in str(caught.value)
            assert caught.value.retryable
            await sub.ack(pending)  # settled during the outage, committed once it is back
            # fetch keeps its bound, also while those commits wait: nothing arrives,
            # nothing crashes
            refusals: list[str] = []
            for _ in range(5):
                try:
                    # well short of the 6 s session a blocking commit would wait out
                    async with asyncio.timeout(4):
                        fetched = await sub.fetch(10, 0.2)
                except TransportUnavailable as exc:
                    refusals.append(str(exc))
                else:
                    assert [d.headers["ce_id"] for d in fetched] == []
            assert all(LOCAL_URL in text for text in refusals)
            release.set()
            await asyncio.sleep(0.5)
            assert not during.done(), "a publish retries while the broker is down"
            assert not svc_during.done(), "a service's publish retries while the broker is down"
            for url in (patient.url, hasty.url):
                logged = warnings_of(caplog, url)
                assert len(logged) == 1, f"one warning per outage, got {logged}"
            spam = [
                r.getMessage()
                for r in caplog.records
                if r.name == LOGGER
                and r.levelno >= logging.WARNING
                and "Connect to" in r.getMessage()
                and "is unreachable" not in r.getMessage()
            ]
            assert not spam, f"failed connection attempts are logged once per outage: {spam[:3]}"
        finally:
            await services("up")

        async with asyncio.timeout(60):
            await during
            await svc_during
        second = messages("second", 10)
        async with asyncio.timeout(60):
            await patient.publish(channel, second)
            await hasty.publish(channel, messages("hasty", 1))
        want = {m.headers["ce_id"] for m in second} | {
            "during-0",
            "during-1",
            "during-2",
            "hasty-0",
        }
        again = await take(sub, want)
        seen = {d.headers["ce_id"] for d in again}
        assert not seen & {d.headers["ce_id"] for d in acked}, (
            "a message acknowledged before the outage came back"
        )
        assert seen <= want | {"pending-0", "pending-1"}, f"unexpected deliveries: {seen - want}"

        after = [f"after-{i}" for i in range(5)]
        for ping_id in after:
            await svc.publish(KafkaRestartPinged(ping_id=ping_id))
        expected = {*before, "during", *after}
        async with asyncio.timeout(45):
            while not expected <= handled.keys():
                await asyncio.sleep(0.05)
        assert set(handled) == expected
        async with asyncio.timeout(30):
            while not svc.health().healthy:
                await asyncio.sleep(0.05)
        assert svc.state == "running"

    for url in (patient.url, hasty.url):
        assert len(warnings_of(caplog, url)) == 1
        assert any(
            r.name == LOGGER and f"Kafka at {url} answers again" in r.getMessage()
            for r in caplog.records
        )


async def test_an_unreachable_broker_fails_connect_with_the_url_and_the_cause() -> None:
    transport = from_url(
        "kafka://app:hunter2@127.0.0.1:1?security_protocol=sasl_plaintext&connect_timeout=2"
    )
    with pytest.raises(TransportUnavailable) as caught:
        async with asyncio.timeout(15):
            await transport.connect()
    text = str(caught.value)
    assert "kafka://app:***@127.0.0.1:1" in text
    assert "hunter2" not in text
    assert "Connection refused" in text, "the error names why the broker cannot be reached"
    await transport.close()
