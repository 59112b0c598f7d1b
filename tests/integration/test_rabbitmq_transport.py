"""What is specific to the RabbitMQ transport: interoperability with plain AMQP
clients, URL options, partition counts, durable delayed redelivery, bad brokers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pamqp.decode
import pytest

from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Transport, from_url
from nervus.transports.rabbitmq import RabbitSettings, RabbitTransport
from nervus.transports.rabbitmq._names import delay_bucket
from nervus.transports.rabbitmq._publisher import field_table

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

MANAGEMENT_PORT = 15672
OPTIONS = "partitions=4&heartbeat_seconds=0.2&session_seconds=2&commit_interval=0.05"


def _url(base: str, options: str = OPTIONS) -> str:
    _BROKERS.add(base)
    return f"{base}{'&' if '?' in base else '?'}{options}"


_NAMED: list[str] = []
_BROKERS: set[str] = set()


def _name(what: str) -> str:
    name = f"it-{what}-{uuid.uuid4().hex[:12]}"
    _NAMED.append(name)
    return name


@pytest.fixture(scope="module", autouse=True)
def _remove_what_the_tests_declared() -> Iterator[None]:
    """Delete, through the management API, the queues and exchanges whose names
    carry a name these tests made (streams keep their data until deleted)."""
    yield
    names, _NAMED[:] = list(_NAMED), []
    if not names:
        return
    for url in _BROKERS:
        parts = urlsplit(url)
        vhost = urllib.parse.quote(urllib.parse.unquote(parts.path[1:]) or "/", safe="")
        base = f"http://{parts.hostname}:{MANAGEMENT_PORT}/api"
        credentials = f"{parts.username or 'guest'}:{parts.password or 'guest'}"
        auth = "Basic " + base64.b64encode(urllib.parse.unquote(credentials).encode()).decode()

        def call(method: str, path: str, base: str = base, auth: str = auth) -> Any:
            request = urllib.request.Request(base + path, method=method)
            request.add_header("Authorization", auth)
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
            return json.loads(body) if body else None

        with contextlib.suppress(OSError, ValueError):  # no management API: nothing to do
            for kind in ("queues", "exchanges"):
                for entry in call("GET", f"/{kind}/{vhost}?columns=name"):
                    if any(name in entry["name"] for name in names):
                        path = urllib.parse.quote(entry["name"], safe="")
                        call("DELETE", f"/{kind}/{vhost}/{path}")


async def _open(url: str) -> Transport:
    transport = from_url(url)
    await transport.connect()
    return transport


async def test_plain_client_reads_what_nervus_publishes(rabbitmq_url: str) -> None:
    channel = _name("out")
    transport = await _open(_url(rabbitmq_url))
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        count = await transport.ensure_channel(channel, 4)
        headers = {
            "ce_id": "evt-1",
            "ce_type": "shop.order.placed.v1",
            "ce_source": "orders",
            "content-type": "application/json",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
        await transport.publish(channel, [OutgoingMessage("order-7", headers, b'{"n": 7}')])

        received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        amqp = await connection.channel()
        await amqp.set_qos(prefetch_count=10)
        for p in range(count):
            queue = await amqp.get_queue(f"nervus.{channel}.{p}", ensure=False)
            await queue.consume(received.put, arguments={"x-stream-offset": "first"})
        async with asyncio.timeout(10):
            message = await received.get()
        assert message.body == b'{"n": 7}'
        assert message.routing_key is not None
        assert message.routing_key.startswith(f"nervus.{channel}.")
        assert message.headers["nervus_key"] == "order-7"
        assert isinstance(message.headers["nervus_published_ms"], int)
        assert message.message_id == "evt-1"
        assert message.content_type == "application/json"
        for name, value in headers.items():
            assert message.headers[name] == value
        await asyncio.sleep(0.2)
        assert received.empty(), "the message reached more than one partition"
    finally:
        await connection.close()
        await transport.close()


async def test_nervus_consumes_what_a_plain_client_publishes(rabbitmq_url: str) -> None:
    channel, group = _name("in"), _name("group")
    transport = await _open(_url(rabbitmq_url))
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        await transport.ensure_channel(channel, 4)
        amqp = await connection.channel(publisher_confirms=True)
        exchange = await amqp.get_exchange(f"nervus.{channel}", ensure=False)
        await exchange.publish(
            aio_pika.Message(
                b"hello",
                headers={"ce_id": "plain-1", "ce_type": "greeting.v1", "x-number": 3},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key="2.customer-9",
        )
        sub = await transport.subscribe([channel], group)
        async with asyncio.timeout(10):
            got: list[Delivery] = []
            while not got:
                got = list(await sub.fetch(10, 0.1))
        [delivery] = got
        assert (delivery.channel, delivery.partition, delivery.key) == (channel, 2, "customer-9")
        assert delivery.body == b"hello"
        assert delivery.headers == {"ce_id": "plain-1", "ce_type": "greeting.v1", "x-number": "3"}
        assert delivery.attempt == 1
        await sub.ack(got)
    finally:
        await connection.close()
        await transport.close()


async def _drain(transport: Transport, channel: str, group: str, count: int) -> list[Delivery]:
    sub = await transport.subscribe([channel], group)
    got: list[Delivery] = []
    try:
        async with asyncio.timeout(20):
            while len(got) < count:
                batch = list(await sub.fetch(1000, 0.2))
                got += batch
                await sub.ack(batch)
        await asyncio.sleep(0.2)
        got += await sub.fetch(1000, 0)
    finally:
        await sub.close()
    return got


async def test_a_subscriber_gets_the_key_headers_and_time_of_what_nervus_publishes(
    rabbitmq_url: str,
) -> None:
    channel, group = _name("fields"), _name("group")
    transport = await _open(_url(rabbitmq_url))
    try:
        await transport.ensure_channel(channel, 3)
        headers = {
            "ce_id": "evt-9",
            "ce_type": "shop.order.placed.v1",
            "ce_source": "orders",
            "ce_specversion": "1.0",
            "ce_time": "2026-01-01T00:00:00Z",
            "content-type": "application/json",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "x-app": "ünïcode ✓",
        }
        before = time.time()
        await transport.publish(
            channel,
            [OutgoingMessage("order-9", headers, b"keyed"), OutgoingMessage(None, {}, b"none")],
        )
        got = {d.body: d for d in await _drain(transport, channel, group, 2)}
        assert set(got) == {b"keyed", b"none"}
        keyed, unkeyed = got[b"keyed"], got[b"none"]
        assert (keyed.key, unkeyed.key) == ("order-9", None)
        assert keyed.headers == headers  # nothing the transport added shows
        assert unkeyed.headers == {}
        assert before - 1 <= keyed.timestamp <= time.time() + 1
    finally:
        await transport.close()


async def test_wrong_stream_port_fails_in_connect(rabbitmq_url: str) -> None:
    transport = from_url(_url(rabbitmq_url, "stream_port=1&connect_timeout=3"))
    with pytest.raises(TransportUnavailable) as caught:
        async with asyncio.timeout(10):
            await transport.connect()
    host = urlsplit(rabbitmq_url).hostname
    assert f"{host}:1" in str(caught.value)
    assert "stream_port=1" in str(caught.value)


async def test_concurrent_publish_calls_all_land_once_in_key_order(rabbitmq_url: str) -> None:
    channel, group = _name("concurrent"), _name("group")
    transport = await _open(_url(rabbitmq_url))
    try:
        await transport.ensure_channel(channel, 4)

        async def call(n: int) -> None:
            await transport.publish(
                channel,
                [
                    OutgoingMessage(f"key-{n % 7}", {"ce_id": f"{n}-{i}"}, f"{n}:{i}".encode())
                    for i in range(n % 5 + 1)
                ],
            )

        # many calls in flight at once share writes; each call's messages keep their order
        await asyncio.gather(*(call(n) for n in range(300)))
        expected = {f"{n}:{i}" for n in range(300) for i in range(n % 5 + 1)}
        got = await _drain(transport, channel, group, len(expected))
        bodies = [d.body.decode() for d in got]
        assert sorted(bodies) == sorted(expected)
        order: dict[int, list[int]] = {}
        for d in sorted(got, key=lambda d: (d.partition, d.offset)):
            n, i = map(int, d.body.decode().split(":"))
            assert (d.key, d.headers["ce_id"]) == (f"key-{n % 7}", f"{n}-{i}")
            order.setdefault(n, []).append(i)
        assert order == {n: list(range(n % 5 + 1)) for n in range(300)}
    finally:
        await transport.close()


async def test_a_message_larger_than_a_frame_arrives_whole(rabbitmq_url: str) -> None:
    channel, group = _name("large"), _name("group")
    transport = await _open(_url(rabbitmq_url))
    try:
        body = bytes(range(256)) * 2000  # 512 KB: several body frames
        headers = {"ce_id": "big-1", "note": "é" * 300}
        await transport.publish(
            channel,
            [
                OutgoingMessage("k", headers, body),
                *[OutgoingMessage("k", {"ce_id": f"small-{i}"}, b"s") for i in range(3)],
            ],
        )
        got = await _drain(transport, channel, group, 4)
        assert [d.headers["ce_id"] for d in got] == ["big-1", "small-0", "small-1", "small-2"]
        assert got[0].body == body
        assert got[0].headers == headers
    finally:
        await transport.close()


async def test_a_call_larger_than_a_stream_frame_arrives_whole(rabbitmq_url: str) -> None:
    channel, group = _name("frames"), _name("group")
    transport = await _open(_url(rabbitmq_url))
    try:
        await transport.ensure_channel(channel, 1)
        body = b"x" * 8000
        # 3 MB to one stream: more than one frame of the stream protocol
        await transport.publish(
            channel, [OutgoingMessage("k", {"n": str(n)}, body) for n in range(375)]
        )
        with pytest.raises(TransportError, match="does not fit"):
            await transport.publish(channel, [OutgoingMessage("k", {}, b"y" * 2_000_000)])
        got = await _drain(transport, channel, group, 375)
        assert [d.headers["n"] for d in got] == [str(n) for n in range(375)]
        assert all(d.body == body for d in got)
    finally:
        await transport.close()


async def test_a_deleted_stream_fails_a_publish_then_is_declared_again(
    rabbitmq_url: str,
) -> None:
    channel = _name("gone")
    transport = await _open(_url(rabbitmq_url))
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        await transport.ensure_channel(channel, 1)
        await transport.publish(channel, [OutgoingMessage("k", {}, b"before")])
        amqp = await connection.channel()
        await amqp.queue_delete(f"nervus.{channel}.0")
        # the call fails, naming the stream, instead of waiting
        with pytest.raises(TransportError, match=f"nervus.{channel}.0"):
            async with asyncio.timeout(10):
                await transport.publish(channel, [OutgoingMessage("k", {}, b"lost")])
        # the next publish declares the stream again
        await transport.publish(channel, [OutgoingMessage("k", {"ce_id": "a-1"}, b"kept")])
        got = await _drain(transport, channel, _name("group"), 1)
        assert [d.body for d in got] == [b"kept"]
    finally:
        await connection.close()
        await transport.close()


async def test_existing_partition_count_wins(rabbitmq_url: str) -> None:
    channel = _name("count")
    first = await _open(_url(rabbitmq_url, "partitions=3"))
    second = await _open(_url(rabbitmq_url, "partitions=5"))
    try:
        assert await first.ensure_channel(channel) == 3
        assert await second.ensure_channel(channel, 6) == 3
    finally:
        await first.close()
        await second.close()


async def test_delayed_redelivery_survives_the_consumer(rabbitmq_url: str) -> None:
    channel, group = _name("durable-nack"), _name("group")
    transport = await _open(_url(rabbitmq_url))
    try:
        await transport.publish(channel, [OutgoingMessage("k", {"ce_id": "n-1"}, b"retry me")])
        sub = await transport.subscribe([channel], group)
        async with asyncio.timeout(10):
            got: list[Delivery] = []
            while not got:
                got = list(await sub.fetch(1, 0.1))
        await sub.nack(got[0], 0.3)
        await sub.close()

        again = await transport.subscribe([channel], group)
        async with asyncio.timeout(10):
            back: list[Delivery] = []
            while not back:
                back = list(await again.fetch(10, 0.1))
        assert [(d.body, d.attempt, d.key, d.offset) for d in back] == [
            (b"retry me", 2, "k", got[0].offset)
        ]
        assert back[0].headers == {"ce_id": "n-1"}
        await again.ack(back)
    finally:
        await transport.close()


async def test_unreachable_broker_fails_in_connect(rabbitmq_url: str) -> None:
    parts = urlsplit(rabbitmq_url)
    closed_port = urlunsplit(parts._replace(netloc="guest:secret@127.0.0.1:1"))
    transport = from_url(_url(closed_port, "connect_timeout=3"))
    with pytest.raises(TransportUnavailable) as caught:
        async with asyncio.timeout(10):
            await transport.connect()
    assert "127.0.0.1:1" in str(caught.value)
    assert "secret" not in str(caught.value)


async def test_wrong_password_fails_in_connect(rabbitmq_url: str) -> None:
    parts = urlsplit(rabbitmq_url)
    host = parts.netloc.rpartition("@")[2]
    wrong = urlunsplit(parts._replace(netloc=f"guest:not-the-password@{host}"))
    transport = from_url(_url(wrong, "connect_timeout=5"))
    with pytest.raises(TransportUnavailable) as caught:
        async with asyncio.timeout(15):
            await transport.connect()
    assert "not-the-password" not in str(caught.value)
    assert host in str(caught.value)


def test_url_options_are_typed_and_stripped() -> None:
    transport = from_url("amqp://u:p@broker:5673/vh?partitions=6&max_age=7D&heartbeat_seconds=2")
    assert isinstance(transport, RabbitTransport)
    settings = transport.settings
    assert settings.amqp_url == "amqp://u:p@broker:5673/vh"
    assert (settings.partitions, settings.max_age, settings.heartbeat_seconds) == (6, "7D", 2.0)


def test_bad_url_options_are_all_reported() -> None:
    with pytest.raises(ConfigurationError) as caught:
        from_url("amqp://broker/?partitions=0&max_age=soon&colour=blue", key="NERVUS_TRANSPORT")
    text = str(caught.value)
    assert "'colour'" in text
    with pytest.raises(ConfigurationError) as caught:
        from_url("amqp://broker/?partitions=0&max_age=soon&session_seconds=1")
    text = str(caught.value)
    assert "partitions=0" in text
    assert "max_age='soon'" in text
    assert "session_seconds=1.0" in text


def test_settings_validate_names_every_problem() -> None:
    problems = RabbitSettings(
        amqp_url="amqp://x/", max_bytes=0, commit_interval=-1, stream_port=0
    ).validate()
    assert len(problems) == 3
    assert any("max_bytes=0" in p for p in problems)
    assert any("stream_port=0" in p for p in problems)


def test_delay_buckets_never_round_down() -> None:
    for delay in (0.0004, 0.05, 0.4, 0.123, 1.234, 59.9, 61.0, 3600.5):
        bucket = delay_bucket(delay)
        assert bucket >= delay * 1000
        assert bucket <= max(delay * 1000 * 1.1, 1)


def test_header_tables_decode_as_a_plain_client_reads_them() -> None:
    headers = {"ce_id": "évt-1", "n": 7, "big": 2**40, "negative": -3, "flag": True, "ratio": 1.5}
    consumed, decoded = pamqp.decode.field_table(field_table(headers))
    assert decoded == headers
    assert consumed == len(field_table(headers))
    with pytest.raises(ValueError, match="128 bytes"):
        field_table({"x" * 129: "too long a name"})
