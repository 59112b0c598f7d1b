"""The NATS JetStream transport through a restart of its server.

While NATS is down, ``publish`` waits up to ``request_timeout`` for the connection
and then fails with ``TransportUnavailable`` naming the server (without its
password); ``fetch`` fails the same way once its timeout is over (the runtime
retries it with backoff); acknowledgements wait in the client's buffer; each
transport logs one warning for the whole outage. Once NATS is back, the same
transport and subscription publish and consume again without being reopened,
nothing acknowledged before the outage comes back, and a ``Service`` running
through the outage handles every event and keeps running.

A server that cannot be reached at start-up fails ``connect()`` within
``connect_timeout`` with the URL and the underlying error.

The server is stopped and started once, with ``scripts/services down|up nats``; its
streams are file-backed, so they and their consumers' acknowledgements survive it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nervus import Context, Event, Service, Settings
from nervus.errors import TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Subscription, from_url
from nervus.transports.nats import NatsTransport

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "scripts" / "services"
LOCAL_URL = "nats://127.0.0.1:4222"
LOGGER = "nervus.transports.nats"
SECRET = "s3cret-password"
REDACTED = "nats://nervus:***@127.0.0.1:4222"


class NatsRestartPinged(Event, type="test.nats-restart.pinged.v1", key="ping_id"):
    ping_id: str


async def services(action: str) -> None:
    """``scripts/services ACTION nats``, failing the test if it does not succeed."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(SERVICES),
        action,
        "nats",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(120):  # the script waits for its lock, shared by all servers
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, f"services {action} nats: {output.decode()}"


@pytest.fixture
def local_nats(nats_url: str) -> Iterator[str]:
    """The URL of the NATS server ``scripts/services`` runs, which this test stops
    and starts; it is left running whatever happens."""
    if nats_url.split("?")[0].rstrip("/") != LOCAL_URL:
        pytest.skip(f"restart tests need the local server {LOCAL_URL}, not {nats_url}")
    yield nats_url
    # the test brings the server back itself; this catches a test that was cancelled
    # (and skips the script's lock, shared with the other servers, when NATS is up)
    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=1).close()
    except OSError:
        subprocess.run(["bash", str(SERVICES), "up", "nats"], check=True, timeout=120)


@pytest.fixture
async def namespace(local_nats: str) -> AsyncIterator[str]:
    """A namespace of this test alone; its streams and bucket are deleted afterwards."""
    import nats

    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    nc = await nats.connect(local_nats, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=10)
        for info in await js.streams_info():
            stream = info.config.name or ""
            if stream.startswith(f"{name}_") or stream == f"KV_{name}-groups":
                await js.delete_stream(stream)
    finally:
        await nc.close()


def url_of(namespace: str, *, password: bool = False) -> str:
    options = {
        "namespace": namespace,
        "partitions": 2,
        "lease_seconds": 1.5,
        "heartbeat_seconds": 0.25,
        "check_interval": 0.05,
        "ack_wait": 5,
        "connect_timeout": 2,
        "request_timeout": 2,
    }
    base = f"nats://nervus:{SECRET}@127.0.0.1:4222" if password else LOCAL_URL
    return f"{base}?{'&'.join(f'{k}={v}' for k, v in options.items())}"


def messages(label: str, count: int) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(key=f"{label}-{i}", headers={"ce_id": f"{label}-{i}"}, body=b"x")
        for i in range(count)
    ]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING
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


@pytest.mark.integration
@pytest.mark.nats
@pytest.mark.slow
async def test_publishers_and_consumers_resume_after_the_server_restarts(
    local_nats: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    transport = from_url(url_of(namespace, password=True))
    assert isinstance(transport, NatsTransport)
    await transport.connect()

    # a service on its own transport, running through the same outage
    settings = Settings(
        transport=url_of(namespace),
        backoff_initial=0.05,
        backoff_max=0.5,
        publish_timeout=30.0,
        shutdown_timeout=5.0,
    )
    svc = Service("restart-nats", settings=settings)
    handled: dict[str, int] = {}
    started: set[str] = set()
    release = asyncio.Event()

    @svc.on(NatsRestartPinged)
    async def handle(event: NatsRestartPinged, ctx: Context) -> None:
        started.add(event.ping_id)
        if event.ping_id.startswith("before"):
            await release.wait()  # still in flight when the server goes away
        handled[event.ping_id] = handled.get(event.ping_id, 0) + 1

    try:
        sub = await transport.subscribe(["orders"], "billing")
        first = messages("first", 10)
        await transport.publish("orders", first)
        acked = await take(sub, {m.headers["ce_id"] for m in first})
        # two more, fetched and still unsettled when the server goes away
        await transport.publish("orders", messages("pending", 2))
        pending = await take(sub, {"pending-0", "pending-1"}, ack=False)
        await transport.client.flush(timeout=5)  # the server has read every ack

        await svc.start()
        before = [f"before-{i}" for i in range(5)]
        for ping_id in before:
            await svc.publish(NatsRestartPinged(ping_id=ping_id))
        async with asyncio.timeout(10):
            while not set(before) <= started:
                await asyncio.sleep(0.02)

        await services("down")
        try:
            async with asyncio.timeout(10):
                while transport.connection_up:
                    await asyncio.sleep(0.02)
            during = asyncio.create_task(svc.publish(NatsRestartPinged(ping_id="during")))

            for _ in range(2):
                with pytest.raises(TransportUnavailable) as caught:
                    async with asyncio.timeout(10):  # request_timeout=2 bounds it
                        await transport.publish("orders", messages("lost", 1))
                assert caught.value.retryable
                assert REDACTED in str(caught.value)
                assert SECRET not in str(caught.value)
            for _ in range(3):
                with pytest.raises(TransportUnavailable) as caught:
                    async with asyncio.timeout(10):
                        await sub.fetch(10, 0.2)
                assert REDACTED in str(caught.value)
                assert SECRET not in str(caught.value)
            await sub.ack(pending)  # settled during the outage, sent once it is back

            async with asyncio.timeout(10):
                while svc.health().healthy:
                    await asyncio.sleep(0.05)
            release.set()
            await asyncio.sleep(0.5)
            assert not during.done(), "a service's publish retries while the server is down"

            logged = warnings_of(caplog)
            assert len(logged) == 2, f"one warning per transport and outage, got {logged}"
            [ours] = [text for text in logged if REDACTED in text]
            pattern = rf"lost the connection to NATS at {re.escape(REDACTED)} \(\w+"
            assert re.search(pattern, ours), f"the warning names the server and the error: {ours}"
            assert SECRET not in ours
            [theirs] = [text for text in logged if text is not ours]
            assert LOCAL_URL in theirs
        finally:
            await services("up")

        # the same transport and subscription, not reopened
        second = messages("second", 10)
        async with asyncio.timeout(20):
            while True:
                try:
                    await transport.publish("orders", second)
                    break
                except TransportUnavailable:  # JetStream still starting up
                    await asyncio.sleep(0.2)
        again = await take(sub, {m.headers["ce_id"] for m in second})
        ids_again = {d.headers["ce_id"] for d in again}
        assert not ids_again & {d.headers["ce_id"] for d in acked}, (
            "a message acknowledged before the outage came back"
        )
        assert not {i for i in ids_again if i.startswith("lost")}, (
            "a publish that failed while the server was down was stored"
        )
        assert ids_again <= {m.headers["ce_id"] for m in second} | {"pending-0", "pending-1"}
        # what was acknowledged during the outage reached the server on reconnect
        js = transport.client.jetstream()
        async with asyncio.timeout(10):
            while True:
                await transport.client.flush(timeout=5)
                infos = [
                    await js.consumer_info(f"{namespace}_orders", f"billing_{p}") for p in (0, 1)
                ]
                if all(i.num_ack_pending == 0 for i in infos):
                    break
                await asyncio.sleep(0.1)
        assert sum(i.num_pending for i in infos) == 0
        assert sub.assignment() == {("orders", 0), ("orders", 1)}

        async with asyncio.timeout(30):
            await during
        after = [f"after-{i}" for i in range(5)]
        for ping_id in after:
            await svc.publish(NatsRestartPinged(ping_id=ping_id))
        expected = {*before, "during", *after}
        async with asyncio.timeout(20):
            while not expected <= handled.keys():
                await asyncio.sleep(0.05)
        async with asyncio.timeout(20):
            while not svc.health().healthy:
                await asyncio.sleep(0.05)
        assert svc.state == "running"
        assert set(handled) == expected

        assert len(warnings_of(caplog)) == 2, "no more warnings once reconnected"
        assert any(
            r.name == LOGGER and r.getMessage().startswith(f"reconnected to NATS at {REDACTED}")
            for r in caplog.records
        )
    finally:
        release.set()
        await svc.stop()
        await transport.close()


@pytest.mark.unit
async def test_a_server_unreachable_at_start_fails_with_the_url_and_the_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts the connection, never speaks NATS
        writer.close()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        # a closed port, and a port that accepts but is not a NATS server
        for url, error in (
            (f"nats://nervus:{SECRET}@127.0.0.1:1", "ConnectionRefusedError"),
            (f"nats://127.0.0.1:{port}", "no NATS server answered"),
        ):
            transport = from_url(f"{url}?connect_timeout=1")
            try:
                with pytest.raises(TransportUnavailable) as caught:
                    async with asyncio.timeout(10):  # connect_timeout=1 bounds it
                        await transport.connect()
            finally:
                await transport.close()
            text = str(caught.value)
            assert url.replace(SECRET, "***") in text
            assert error in text
            assert SECRET not in text
            assert caught.value.retryable
    finally:
        listener.close()
        await listener.wait_closed()
