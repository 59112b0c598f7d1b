"""The runtime through a broker outage: publishes and fetches retry with backoff,
the outage shows in ``health()`` and in the log, and everything resumes after it.

The outage is made by a real in-memory transport whose calls fail while a switch
is off; tests against real servers stopping and restarting are in
``tests/integration/test_*_restart.py``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable, Sequence

import pytest

from nervus import Context, Event, Service, Settings
from nervus.errors import TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Start, Subscription
from nervus.transports.memory import MemorySubscription, MemoryTransport

pytestmark = pytest.mark.unit


class PingSent(Event, type="outage.ping.sent.v1", key="ping_id"):
    ping_id: str


class Switchable(MemoryTransport):
    """An in-memory broker that can be made unreachable."""

    reachable = True

    def _check_reachable(self) -> None:
        if not self.reachable:
            raise TransportUnavailable("memory broker switched off for the test")

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        self._check_reachable()
        await super().publish(channel, messages)

    async def subscribe(
        self,
        channels: Iterable[str],
        group: str,
        *,
        max_in_flight: int = 1000,
        start: Start | None = None,
    ) -> Subscription:
        sub = await super().subscribe(channels, group, max_in_flight=max_in_flight, start=start)
        assert isinstance(sub, MemorySubscription)
        transport = self
        original = sub.fetch

        async def fetch(max_messages: int, timeout: float) -> Sequence[Delivery]:
            if not transport.reachable:
                await asyncio.sleep(0.01)
                raise TransportUnavailable("memory broker switched off for the test")
            return await original(max_messages, timeout)

        sub.fetch = fetch  # type: ignore[method-assign]
        return sub


def make(**overrides: object) -> tuple[Service, Switchable]:
    transport = Switchable(f"outage-{uuid.uuid4().hex}", partitions=2)
    options: dict[str, object] = {"backoff_initial": 0.05, "backoff_max": 0.1}
    options.update(overrides)
    svc = Service(
        "pinger", settings=Settings(transport="memory://x", **options), transport=transport
    )  # type: ignore[arg-type]
    return svc, transport


async def test_publish_retries_through_an_outage_and_health_shows_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc, transport = make(publish_timeout=10.0)
    async with svc:
        transport.reachable = False
        publishing = asyncio.create_task(svc.publish(PingSent(ping_id="p-1")))
        async with asyncio.timeout(5):
            while not svc.health().problems:
                await asyncio.sleep(0.01)
        health = svc.health()
        assert not health.healthy
        assert "publishing" in health.problems[0]
        assert "switched off" in health.problems[0]
        assert not publishing.done(), "a publish waits for the broker while it is down"
        transport.reachable = True
        await asyncio.wait_for(publishing, 5)
        assert svc.health().problems == []
    logged = [r.getMessage() for r in caplog.records if r.name == "nervus.runtime"]
    assert sum("failed, retrying with backoff" in m for m in logged) == 1, "logged once"
    assert any("works again" in m for m in logged)


async def test_publish_gives_up_after_publish_timeout() -> None:
    svc, transport = make(publish_timeout=0.0)
    async with svc:
        transport.reachable = False
        with pytest.raises(TransportUnavailable):
            await svc.publish(PingSent(ping_id="p-1"))


async def test_consumers_retry_fetching_and_resume(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nervus.runtime")
    svc, transport = make()
    seen: list[str] = []

    @svc.on(PingSent)
    async def handle(event: PingSent, ctx: Context) -> None:
        seen.append(event.ping_id)

    async with svc:
        await svc.publish(PingSent(ping_id="before"))
        async with asyncio.timeout(5):
            while seen != ["before"]:
                await asyncio.sleep(0.01)
        transport.reachable = False
        async with asyncio.timeout(5):
            while svc.health().healthy:
                await asyncio.sleep(0.01)
        group = svc.health().groups["pinger"]
        assert not group.fetching
        assert any("fetching" in p for p in svc.health().problems)
        transport.reachable = True
        await svc.publish(PingSent(ping_id="after"))
        async with asyncio.timeout(5):
            while seen != ["before", "after"]:
                await asyncio.sleep(0.01)
        async with asyncio.timeout(5):
            while not svc.health().healthy:
                await asyncio.sleep(0.01)
        assert svc.state == "running"
