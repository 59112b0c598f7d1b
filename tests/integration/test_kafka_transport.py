"""What is specific to the Kafka transport: its URL, its topics, interoperability
with other Kafka clients (kcat), and redeliveries that outlive their consumer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from nervus.core import Envelope
from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Subscription, Transport, from_url
from nervus.transports.kafka import KafkaSettings, KafkaTransport, retry_topic

pytestmark = pytest.mark.kafka

FAST = "partitions=3&session_timeout=6&heartbeat_interval=0.5&linger_ms=1&commit_interval=0.02"
TIMEOUT = 15.0


RUN = uuid.uuid4().hex[:8]
NAMED: list[str] = []


def unique(what: str) -> str:
    """A topic or group name of this module's run (deleted when the module ends)."""
    NAMED.append(what)
    return f"nervus-kafka-{what}-{RUN}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module", autouse=True)
def delete_topics_of_this_run() -> Iterator[None]:
    yield
    if not NAMED:
        return  # no test reached the broker
    url = os.environ.get("NERVUS_TEST_KAFKA_URL") or "kafka://127.0.0.1:9092"
    bootstrap = KafkaTransport.from_url(url).settings.bootstrap_servers
    admin = AdminClient({"bootstrap.servers": bootstrap})
    with contextlib.suppress(KafkaException):  # best effort: retention removes the rest
        topics = [t for t in admin.list_topics(timeout=10).topics if RUN in t]
        if topics:
            for future in admin.delete_topics(topics, operation_timeout=30).values():
                future.result()
        listed = admin.list_consumer_groups(request_timeout=10).result()
        groups = [g.group_id for g in listed.valid if RUN in g.group_id]
        if groups:
            for future in admin.delete_consumer_groups(groups, request_timeout=10).values():
                future.result()


@pytest.fixture
async def transport(kafka_url: str) -> AsyncIterator[Transport]:
    t = from_url(f"{kafka_url}?{FAST}")
    await t.connect()
    try:
        yield t
    finally:
        await t.close()


async def consume(sub: Subscription, count: int, *, ack: bool = True) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(TIMEOUT):
        while len(got) < count:
            batch = await sub.fetch(count - len(got), 0.1)
            got.extend(batch)
            if ack and batch:
                await sub.ack(batch)
    return got


async def kcat(*args: str, stdin: bytes | None = None) -> str:
    path = shutil.which("kcat")
    if path is None:
        pytest.fail("kcat is not installed; scripts/services up installs it")
    process = await asyncio.create_subprocess_exec(
        path,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(TIMEOUT):
        out, err = await process.communicate(stdin)
    assert process.returncode == 0, f"kcat {' '.join(args)} failed: {err.decode()}"
    return out.decode()


# -- the URL --------------------------------------------------------------------------


@pytest.mark.unit
def test_url_options_become_settings() -> None:
    transport = KafkaTransport.from_url(
        "kafka://app:s%40cret@k1:9093,k2,[::1]:9094?partitions=12&compression=zstd"
        "&security_protocol=sasl_ssl&sasl_mechanism=SCRAM-SHA-512&session_timeout=30"
        "&librdkafka.ssl.ca.location=/etc/ca.pem"
    )
    s = transport.settings
    assert s.bootstrap_servers == "k1:9093,k2:9092,[::1]:9094"
    assert (s.username, s.password) == ("app", "s@cret")
    assert (s.partitions, s.compression, s.session_timeout) == (12, "zstd", 30.0)
    assert s.librdkafka == {"ssl.ca.location": "/etc/ca.pem"}
    config = s.consumer_config(logging.getLogger("test"), "g", 50)
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["ssl.ca.location"] == "/etc/ca.pem"
    assert config["partition.assignment.strategy"] == "cooperative-sticky"
    assert config["enable.auto.commit"] is False
    assert config["queued.min.messages"] == 50
    producer = s.producer_config(logging.getLogger("test"))
    assert (producer["enable.idempotence"], producer["acks"]) == (True, "all")
    assert "s@cret" not in transport.url and "s%40cret" not in transport.url
    assert "cret" not in repr(s)


@pytest.mark.unit
def test_every_bad_option_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        from_url(
            "kafka://127.0.0.1:9092?partitions=zero&colour=blue&compression=brotli",
            key="ORDERS_TRANSPORT",
        )
    text = str(caught.value)
    assert "ORDERS_TRANSPORT" in text
    for name in ("partitions", "colour", "compression"):
        assert name in text
    assert len(caught.value.problems) == 3

    with pytest.raises(ConfigurationError) as caught:
        from_url(
            "kafka://127.0.0.1?session_timeout=6&heartbeat_interval=3"
            "&librdkafka.enable.auto.commit=true&librdkafka.acks=1"
        )
    problems = caught.value.problems
    assert any("heartbeat_interval=3.0" in p for p in problems), problems
    assert any("librdkafka.enable.auto.commit" in p for p in problems), problems
    assert any("librdkafka.acks" in p for p in problems), problems

    with pytest.raises(ConfigurationError, match="security_protocol"):
        from_url("kafka://user:pw@127.0.0.1:9092")
    with pytest.raises(ConfigurationError, match="no path"):
        from_url("kafka://127.0.0.1:9092/topic")


@pytest.mark.unit
def test_settings_validate_lists_problems() -> None:
    settings = KafkaSettings(bootstrap_servers="", partitions=0, max_poll_interval=1)
    problems = settings.validate()
    assert len(problems) == 3, problems


# -- connecting -------------------------------------------------------------------------


@pytest.mark.integration
async def test_unreachable_broker_fails_connect_naming_the_url() -> None:
    transport = from_url(
        "kafka://app:hunter2@127.0.0.1:1?security_protocol=sasl_plaintext&connect_timeout=1"
    )
    started = time.monotonic()
    with pytest.raises(TransportUnavailable) as caught:
        async with asyncio.timeout(TIMEOUT):
            await transport.connect()
    assert time.monotonic() - started < TIMEOUT
    text = str(caught.value)
    assert "kafka://app:***@127.0.0.1:1" in text
    assert "hunter2" not in text
    assert caught.value.retryable
    await transport.close()


@pytest.mark.integration
async def test_unknown_librdkafka_property_fails_connect(kafka_url: str) -> None:
    transport = from_url(f"{kafka_url}?librdkafka.no.such.property=1")
    with pytest.raises(ConfigurationError, match=r"no\.such\.property"):
        await transport.connect()
    await transport.close()


@pytest.mark.integration
async def test_extra_librdkafka_property_is_used(kafka_url: str) -> None:
    transport = from_url(f"{kafka_url}?{FAST}&librdkafka.socket.keepalive.enable=true")
    async with transport:
        channel = unique("extra")
        await transport.publish(channel, [OutgoingMessage(key=None, headers={}, body=b"x")])


# -- topics -----------------------------------------------------------------------------


@pytest.mark.integration
async def test_existing_partition_count_wins(transport: Transport, kafka_url: str) -> None:
    channel = unique("count")
    assert await transport.ensure_channel(channel, 2) == 2
    other = from_url(f"{kafka_url}?partitions=5")
    async with other:
        assert await other.ensure_channel(channel, 6) == 2
        assert await other.ensure_channel(unique("default")) == 5


@pytest.mark.integration
async def test_invalid_topic_name_is_a_configuration_error(transport: Transport) -> None:
    with pytest.raises(ConfigurationError, match="no spaces"):
        await transport.ensure_channel("no spaces allowed")


@pytest.mark.integration
async def test_rejected_message_fails_publish_naming_the_topic(transport: Transport) -> None:
    channel = unique("too-big")
    huge = OutgoingMessage(key="k", headers={}, body=b"x" * 2_000_000)
    with pytest.raises(TransportError, match=channel):
        await transport.publish(channel, [huge])


# -- interoperability -----------------------------------------------------------------


@pytest.mark.integration
async def test_kcat_reads_what_nervus_published(
    transport: Transport, kafka_bootstrap_servers: str
) -> None:
    channel = unique("to-kcat")
    envelope = Envelope.new(
        type="shop.order.placed.v1",
        source="/orders",
        data=b'{"order_id":"o-1"}',
        partitionkey="o-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    headers = envelope.to_headers()
    await transport.publish(
        channel, [OutgoingMessage(key="o-1", headers=headers, body=envelope.data)]
    )
    out = await kcat(
        "-C", "-b", kafka_bootstrap_servers, "-t", channel, "-o", "beginning", "-c", "1", "-J"
    )
    record = json.loads(out.strip().splitlines()[-1])
    names = record["headers"][0::2]
    seen = dict(zip(names, record["headers"][1::2], strict=True))
    assert seen == headers
    assert record["key"] == "o-1"
    assert record["payload"] == '{"order_id":"o-1"}'
    assert Envelope.from_headers(seen, record["payload"].encode()) == envelope


@pytest.mark.integration
async def test_nervus_consumes_what_kcat_produced(
    transport: Transport, kafka_bootstrap_servers: str
) -> None:
    channel, group = unique("from-kcat"), unique("group")
    await transport.ensure_channel(channel)
    await kcat(
        "-P",
        "-b",
        kafka_bootstrap_servers,
        "-t",
        channel,
        "-k",
        "o-7",
        "-H",
        "ce_id=0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "-H",
        "ce_type=shop.order.placed.v1",
        "-H",
        "ce_source=/kcat",
        "-H",
        "ce_specversion=1.0",
        "-H",
        "content-type=application/json",
        stdin=b'{"order_id":"o-7"}',
    )
    sub = await transport.subscribe([channel], group)
    [d] = await consume(sub, 1)
    assert d.key == "o-7"
    envelope = Envelope.from_headers(d.headers, d.body)
    assert envelope.id == "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    assert envelope.type == "shop.order.placed.v1"
    assert envelope.source == "/kcat"
    assert envelope.data == b'{"order_id":"o-7"}'


@pytest.mark.integration
async def test_keys_reach_the_partition_the_java_client_picks(
    transport: Transport, kafka_bootstrap_servers: str
) -> None:
    channel, group = unique("keys"), unique("group")
    await transport.ensure_channel(channel, 6)
    keys = [f"customer-{i}" for i in range(12)]
    await transport.publish(
        channel, [OutgoingMessage(key=k, headers={"by": "nervus"}, body=b"") for k in keys]
    )
    lines = "".join(f"{k}\t\n" for k in keys).encode()
    await kcat(
        "-P", "-b", kafka_bootstrap_servers, "-t", channel, "-K", "\t",
        "-X", "topic.partitioner=murmur2_random", "-H", "by=kcat", stdin=lines,
    )  # fmt: skip
    sub = await transport.subscribe([channel], group)
    got = await consume(sub, 2 * len(keys))
    where: dict[tuple[str, str | None], int] = {
        (d.headers.get("by", "kcat"), d.key): d.partition for d in got
    }
    for k in keys:
        assert where[("nervus", k)] == where[("kcat", k)], f"key {k!r} split across partitions"
    assert len({where[("nervus", k)] for k in keys}) > 1


# -- redelivery -------------------------------------------------------------------------


@pytest.mark.integration
async def test_nacked_message_outlives_its_consumer(kafka_url: str) -> None:
    url = f"{kafka_url}?{FAST}"
    channel, group = unique("nack-durable"), unique("group")
    first = from_url(url)
    async with first:
        await first.publish(channel, [OutgoingMessage(key="k", headers={"n": "1"}, body=b"one")])
        sub = await first.subscribe([channel], group)
        [d] = await consume(sub, 1, ack=False)
        nacked_at = time.time()
        await sub.nack(d, 1.0)
    # The retry copy sits in the group's retry topic, in the partition of the original.
    assert retry_topic(channel, group) == f"{channel}.{group}.retry"

    second = from_url(url)
    async with second:
        sub = await second.subscribe([channel], group)
        [again] = await consume(sub, 1)
        assert time.time() >= nacked_at + 1.0
        assert (again.channel, again.partition, again.offset) == (d.channel, d.partition, d.offset)
        assert again.attempt == 2
        assert again.key == "k"
        assert again.body == b"one"
        assert again.headers == {"n": "1"}
        quiet = await sub.fetch(10, 0.5)
        assert not quiet, f"came again after ack: {quiet}"


@pytest.mark.integration
async def test_cancelled_fetch_loses_nothing(transport: Transport) -> None:
    channel, group = unique("cancel"), unique("group")
    await transport.ensure_channel(channel)
    sub = await transport.subscribe([channel], group)
    waiting = asyncio.ensure_future(sub.fetch(10, 3.0))
    await asyncio.sleep(0.3)
    waiting.cancel()
    await transport.publish(
        channel, [OutgoingMessage(key=f"k{n}", headers={}, body=str(n).encode()) for n in range(5)]
    )
    got = await consume(sub, 5)
    assert sorted(int(d.body) for d in got) == list(range(5))


# -- membership while the caller is busy ----------------------------------------------------


@pytest.mark.integration
async def test_a_member_joins_while_the_first_one_is_busy(kafka_url: str) -> None:
    """The first member fetches once and then stops fetching (its handlers are all
    busy, its read-ahead buffer full). A second member joining the group still gets
    its share of the partitions in bounded time, far sooner than
    ``max_poll_interval`` (which bounds a rebalance the first member does not
    serve); and once the first member goes on, every message reaches one of them."""
    url = f"{kafka_url}?{FAST}&max_poll_interval=120"
    channel, group = unique("busy"), unique("group")
    messages = [OutgoingMessage(key=f"k{n}", headers={}, body=str(n).encode()) for n in range(200)]
    first, second = from_url(url), from_url(url)
    async with first, second:
        await first.ensure_channel(channel, 4)
        await first.publish(channel, messages)
        busy = await first.subscribe([channel], group, max_in_flight=5)
        held = await consume(busy, 5, ack=False)  # then no fetch for a long while
        assert len(busy.assignment()) == 4
        await asyncio.sleep(1.0)  # long past the point where its buffer is full

        joined_at = time.monotonic()
        late = await second.subscribe([channel], group, max_in_flight=50)
        async with asyncio.timeout(30):
            while not late.assignment() or len(busy.assignment()) == 4:
                await asyncio.sleep(0.05)
        took = time.monotonic() - joined_at
        assert took < 20, f"the second member waited {took:.1f} s for its partitions"
        async with asyncio.timeout(TIMEOUT):
            while len(busy.assignment() | late.assignment()) != 4:
                await asyncio.sleep(0.05)
        assert not busy.assignment() & late.assignment()

        # The first member finishes its busy spell; settling what it read from a
        # partition it gave up changes nothing (the second member reads it again).
        await busy.ack(held)
        seen = {int(d.body) for d in held if (channel, d.partition) in busy.assignment()}
        async with asyncio.timeout(TIMEOUT):
            while len(seen) < len(messages):
                for sub in (busy, late):
                    batch = await sub.fetch(50, 0.05)
                    seen.update(int(d.body) for d in batch)
                    if batch:
                        await sub.ack(batch)
        assert seen == set(range(len(messages)))
