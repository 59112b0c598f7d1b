"""The RabbitMQ transport survives its broker going away and coming back.

The broker is stopped and started again (``scripts/services down|up rabbitmq``)
once, in the middle of one test: a raw publisher and group member, and a running
``Service``, all on one transport, go through the outage. While the broker is down
``publish`` and ``fetch`` raise ``TransportUnavailable`` naming the broker, and
each connection logs one warning; once it is back the same transport and
subscription publish and consume again, without losing or replaying what was
acknowledged before the outage.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from _rabbitmq_support import fetch_ids, ids, messages

from nervus import Context, Event, Service, Settings
from nervus.errors import TransportUnavailable
from nervus.transports import from_url
from nervus.transports.rabbitmq import RabbitSubscription, RabbitTransport

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.slow]

SERVICES = Path(__file__).resolve().parents[2] / "scripts" / "services"
OPTIONS = (
    "partitions=2&heartbeat_seconds=0.2&session_seconds=2&commit_interval=0.05"
    "&connect_timeout=5&publish_timeout=5"
)
SERVER_TIMEOUT = 120.0  # what scripts/services may take to stop or start the broker
RECOVERY_TIMEOUT = 30.0  # what the restarted broker may take to serve clients again
LOGGER = "nervus.transports.rabbitmq"


def _server(action: str) -> None:
    """``scripts/services <action> rabbitmq``, failing the test with its output."""
    done = subprocess.run(
        ["bash", str(SERVICES), action, "rabbitmq"],
        capture_output=True,
        text=True,
        timeout=SERVER_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (
        f"scripts/services {action} rabbitmq failed ({done.returncode}):\n"
        f"{done.stdout}{done.stderr}"
    )


@pytest.fixture
def restartable_rabbitmq(rabbitmq_url: str) -> Iterator[str]:
    """The broker's URL, for a test that stops it; the broker is running again after."""
    if urlsplit(rabbitmq_url).hostname not in ("127.0.0.1", "localhost"):
        pytest.skip(f"scripts/services cannot restart the broker at {rabbitmq_url}")
    try:
        yield rabbitmq_url
    finally:
        _server("up")


async def _in_thread(action: str) -> None:
    await asyncio.to_thread(_server, action)


async def test_publishers_and_consumers_resume_after_a_broker_restart(
    restartable_rabbitmq: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    url = f"{restartable_rabbitmq}{'&' if '?' in restartable_rabbitmq else '?'}{OPTIONS}"
    uid = uuid.uuid4().hex[:12]
    channel, group = f"it-restart-{uid}", f"it-restart-{uid}"

    class Ping(Event, type=f"it.restart.ping.{uid}.v1", channel=f"it-restart-svc-{uid}"):
        n: int

    handled: list[int] = []
    service = Service(
        f"restart-{uid}",
        settings=Settings(
            transport=url,
            backoff_initial=0.05,
            backoff_max=0.5,
            backoff_jitter=0.0,
            publish_timeout=2 * SERVER_TIMEOUT + RECOVERY_TIMEOUT,
            shutdown_timeout=5.0,
        ),
        transport=from_url(url),
    )

    @service.on(Ping)
    async def count(event: Ping, ctx: Context) -> None:
        handled.append(event.n)

    async def handled_all(numbers: range, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not set(numbers) <= set(handled):
                await asyncio.sleep(0.05)

    transport = service.transport
    assert isinstance(transport, RabbitTransport)
    late: asyncio.Task[None] | None = None
    async with asyncio.timeout(2 * SERVER_TIMEOUT + 3 * RECOVERY_TIMEOUT):
        await service.start()
        try:
            sub = await transport.subscribe([channel], group, max_in_flight=100)
            assert isinstance(sub, RabbitSubscription)

            # 1. A first batch, consumed and acknowledged; a second one fetched and
            #    left unsettled; the service handles a few events.
            first, held = messages("first", 12), messages("held", 4)
            await transport.publish(channel, first)
            await sub.ack(await fetch_ids(sub, ids(first), 15))
            await transport.publish(channel, held)
            unsettled = await fetch_ids(sub, ids(held), 15)
            for n in range(5):
                await service.publish(Ping(n=n))
            await handled_all(range(5), 15)

            # 2. The broker goes away.
            caplog.clear()
            await _in_thread("down")
            restarted = False
            try:
                with pytest.raises(TransportUnavailable) as caught:
                    async with asyncio.timeout(15):
                        await transport.publish(channel, messages("lost", 1))
                text = str(caught.value)
                assert transport.where in text, text
                assert restartable_rabbitmq not in text, "the password leaked into an error"
                for _ in range(2):  # fails again, and logs no more warnings
                    with pytest.raises(TransportUnavailable):
                        async with asyncio.timeout(15):
                            await transport.publish(channel, messages("lost", 1))

                fetch_error: TransportUnavailable | None = None
                async with asyncio.timeout(15):
                    while fetch_error is None:
                        try:
                            assert not await sub.fetch(10, 0.1)
                        except TransportUnavailable as exc:
                            fetch_error = exc
                assert transport.where in str(fetch_error)
                for _ in range(3):
                    with pytest.raises(TransportUnavailable):
                        await sub.fetch(10, 0.1)
                await sub.ack(unsettled)  # revoked by the outage: they come again

                # the service publishes through the outage (its runtime retries)
                late = asyncio.create_task(service.publish_many([Ping(n=n) for n in range(5, 10)]))
                await asyncio.sleep(0.5)
                assert not late.done()

                lost = [
                    r
                    for r in caplog.records
                    if r.name == LOGGER
                    and r.levelno == logging.WARNING
                    and "lost its connection" in r.getMessage()
                ]
                assert all(transport.where in r.getMessage() for r in lost)
                assert all(restartable_rabbitmq not in r.getMessage() for r in lost)
                assert sum("the RabbitMQ transport" in r.getMessage() for r in lost) == 1
                assert sum(sub.member in r.getMessage() for r in lost) == 1

                # 3. The broker comes back.
                await _in_thread("up")
                restarted = True
            finally:
                if not restarted:
                    await _in_thread("up")

            second = messages("second", 12)
            # a broker recovering many queues may take a while to answer again
            async with asyncio.timeout(RECOVERY_TIMEOUT):
                while True:
                    try:
                        await transport.publish(channel, second)
                        break
                    except TransportUnavailable:
                        await asyncio.sleep(0.2)
            after = await fetch_ids(sub, ids(second) | ids(held), RECOVERY_TIMEOUT)
            await sub.ack(after)
            assert not ids(after) & ids(first), "acknowledged messages came again"
            # the member takes its partitions back as its membership loop comes round
            async with asyncio.timeout(RECOVERY_TIMEOUT):
                while sub.assignment() != {(channel, 0), (channel, 1)}:
                    extra = await sub.fetch(10, 0.2)
                    assert not ids(extra) & ids(first), "acknowledged messages came again"
                    await sub.ack(extra)

            await late
            await handled_all(range(10), RECOVERY_TIMEOUT)
            assert service.state == "running"
            assert [r for r in caplog.records if "reconnected" in r.getMessage()]
        finally:
            if late is not None and not late.done():
                late.cancel()
            await service.stop()
    assert transport.where in caplog.text
