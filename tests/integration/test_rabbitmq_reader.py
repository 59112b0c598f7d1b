"""The stream reader against a real broker: consuming a stream from an offset, the
broker's refusals, and a group member that loses its stream reader's connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from _rabbitmq_support import fetch_ids, ids, messages

from conftest import require_service
from nervus.errors import TransportError, TransportUnavailable
from nervus.transports import from_url
from nervus.transports.rabbitmq import RabbitSubscription, RabbitTransport
from nervus.transports.rabbitmq._reader import connect
from nervus.transports.rabbitmq._settings import redact

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

MANAGEMENT_PORT = 15672
OPTIONS = "partitions=2&heartbeat_seconds=0.2&session_seconds=2&commit_interval=0.05"
LOGGER = "nervus.transports.rabbitmq"


class _Management:
    """The broker's management API, for what a client cannot do to itself."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.vhost = urllib.parse.quote(urllib.parse.unquote(parts.path[1:]) or "/", safe="")
        self.base = f"http://{parts.hostname}:{MANAGEMENT_PORT}/api"
        credentials = f"{parts.username or 'guest'}:{parts.password or 'guest'}"
        self.auth = "Basic " + base64.b64encode(urllib.parse.unquote(credentials).encode()).decode()

    def call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.base + path, method=method)
        request.add_header("Authorization", self.auth)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def delete_named(self, names: list[str]) -> None:
        for kind in ("queues", "exchanges"):
            for entry in self.call("GET", f"/{kind}/{self.vhost}?columns=name"):
                if any(name in entry["name"] for name in names):
                    path = urllib.parse.quote(entry["name"], safe="")
                    self.call("DELETE", f"/{kind}/{self.vhost}/{path}")

    async def close_connection(self, connection_name: str, timeout: float = 30.0) -> None:
        """Have the broker close the connection whose client named it ``connection_name``
        (the API lists a new connection within its statistics interval)."""
        async with asyncio.timeout(timeout):
            while True:
                listed = await asyncio.to_thread(
                    self.call, "GET", "/connections?columns=name,client_properties"
                )
                for entry in listed:
                    if entry.get("client_properties", {}).get("connection_name") == connection_name:
                        path = urllib.parse.quote(entry["name"], safe="")
                        await asyncio.to_thread(self.call, "DELETE", f"/connections/{path}")
                        return
                await asyncio.sleep(0.5)


@pytest.fixture
def management(rabbitmq_url: str) -> _Management:
    api = _Management(rabbitmq_url)
    host = urlsplit(rabbitmq_url).hostname or "127.0.0.1"
    require_service("RabbitMQ's management API", host, MANAGEMENT_PORT)
    return api


@pytest.fixture
def names(rabbitmq_url: str) -> Iterator[list[str]]:
    """Names the test declares under; their queues and exchanges are deleted after it."""
    made: list[str] = []
    yield made
    with contextlib.suppress(OSError, ValueError):
        _Management(rabbitmq_url).delete_named(made)


async def test_the_reader_consumes_a_stream_from_an_offset(
    rabbitmq_url: str, names: list[str]
) -> None:
    stream = f"it-reader-{uuid.uuid4().hex[:12]}"
    names.append(stream)
    big = bytes(range(256)) * 1600  # 400 KB: several frames of the broker's frame_max
    connection = await aio_pika.connect(rabbitmq_url)
    reader = None
    try:
        channel = await connection.channel()
        await channel.declare_queue(stream, durable=True, arguments={"x-queue-type": "stream"})
        for n in range(5):
            await channel.default_exchange.publish(
                aio_pika.Message(
                    big if n == 3 else f"body {n}".encode(),
                    headers={"n": n, "ce_id": f"e-{n}", "big": 2**40},
                ),
                routing_key=stream,
            )
        reader = await connect(
            rabbitmq_url, where=redact(rabbitmq_url), timeout=10, name="nervus reader test"
        )
        got: list[tuple[int, str, dict[str, Any], bytes]] = []
        closed: list[TransportError] = []
        consumer = reader.consumer()
        await consumer.consume(
            stream,
            prefetch=10,
            arguments={"x-stream-offset": 2},
            on_delivery=lambda *delivery: got.append(delivery),
            on_closed=closed.append,
        )
        async with asyncio.timeout(10):
            while len(got) < 3:
                await asyncio.sleep(0.01)
        assert [headers["x-stream-offset"] for _, _, headers, _ in got] == [2, 3, 4]
        assert [headers["ce_id"] for _, _, headers, _ in got] == ["e-2", "e-3", "e-4"]
        assert got[0][2]["big"] == 2**40
        assert [body for *_, body in got] == [b"body 2", big, b"body 4"]
        assert {routing_key for _, routing_key, _, _ in got} == {stream}
        consumer.ack(got[-1][0], multiple=True)

        missing = reader.consumer()
        with pytest.raises(TransportError) as caught:
            await missing.consume(
                f"{stream}-missing", prefetch=1, on_delivery=print, on_closed=print
            )
        assert "404 NOT_FOUND" in str(caught.value)
        assert redact(rabbitmq_url) in str(caught.value)
        assert reader.is_open and consumer.is_open

        await consumer.cancel()
        await consumer.close()
        assert closed == []
    finally:
        if reader is not None:
            await reader.close()
        await connection.close()


@pytest.mark.parametrize(
    ("change", "reason"),
    [("password", "403 ACCESS_REFUSED"), ("virtual host", "530 NOT_ALLOWED")],
)
async def test_a_refused_login_names_the_broker_and_its_reason(
    rabbitmq_url: str, change: str, reason: str
) -> None:
    parts = urlsplit(rabbitmq_url)
    host = parts.netloc.rpartition("@")[2]
    if change == "password":
        wrong = urlunsplit(parts._replace(netloc=f"{parts.username}:not-the-password@{host}"))
    else:
        wrong = urlunsplit(parts._replace(path=f"/nervus-missing-{uuid.uuid4().hex[:8]}"))
    with pytest.raises(TransportUnavailable) as caught:
        await connect(wrong, where=redact(wrong), timeout=10, name="nervus reader test")
    text = str(caught.value)
    assert redact(wrong) in text and reason in text
    assert "not-the-password" not in text


async def test_a_member_that_loses_its_stream_reader_goes_through_an_outage(
    rabbitmq_url: str,
    names: list[str],
    management: _Management,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    uid = uuid.uuid4().hex[:12]
    channel, group = f"it-reader-{uid}", f"it-reader-group-{uid}"
    names.append(uid)
    transport = from_url(f"{rabbitmq_url}{'&' if '?' in rabbitmq_url else '?'}{OPTIONS}")
    assert isinstance(transport, RabbitTransport)
    await transport.connect()
    try:
        sub = await transport.subscribe([channel], group, max_in_flight=50)
        assert isinstance(sub, RabbitSubscription)
        settled, held = messages("settled", 10), messages("held", 5)
        await transport.publish(channel, settled)
        await sub.ack(await fetch_ids(sub, ids(settled), 15))
        await transport.publish(channel, held)
        unsettled = await fetch_ids(sub, ids(held), 15)

        caplog.clear()
        await management.close_connection(f"nervus streams of {sub.member} in group {group}")
        error: TransportUnavailable | None = None
        async with asyncio.timeout(15):
            while error is None:
                try:
                    assert not ids(await sub.fetch(10, 0.1)) & ids(settled)
                except TransportUnavailable as exc:
                    error = exc
        assert transport.where in str(error)
        await sub.ack(unsettled)  # revoked by the outage: they come again

        after = await fetch_ids(sub, ids(held), 30)
        assert not ids(after) & ids(settled), "settled messages came again"
        await sub.ack(after)
        async with asyncio.timeout(30):
            while sub.assignment() != {(channel, 0), (channel, 1)}:
                extra = await sub.fetch(10, 0.2)
                assert not ids(extra) & ids(settled), "settled messages came again"
                await sub.ack(extra)
        lost = [
            r.getMessage()
            for r in caplog.records
            if r.name == LOGGER and "lost its connection" in r.getMessage()
        ]
        assert len(lost) == 1 and sub.member in lost[0]
        assert "320 CONNECTION_FORCED" in lost[0], lost[0]
        assert any("reconnected" in r.getMessage() for r in caplog.records)
        await sub.close()
    finally:
        await transport.close()
