"""The event log is the outbox: a relay publishes stored events to the transport.

``Relay`` reads the store's global log from its checkpoint, publishes each event
to its type's channel with the stream id as the partition key (so a stream's
events keep their order on every broker), and then moves the checkpoint. A crash
anywhere loses nothing: events published but not yet checkpointed are published
again after a restart, with the same event id (consumers deduplicate by id where
it matters). Events are published as stored: the envelope's id, time, correlation
and causation ids and trace context travel unchanged.

One relay at a time
    Several processes of a service (or several services sharing a store) may each
    run a relay of the same name; a lease kept beside the checkpoint lets one of
    them work and the others wait, taking over within ``lease_seconds`` when the
    holder stops renewing. The checkpoint moves by compare-and-set, so even two
    holders (a paused process whose lease ran out) never move it backwards.

When the broker is down, publishing retries with backoff (the service's
``publish_timeout`` and retry policy); the checkpoint stays until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from nervus.core import REGISTRY, TypeRegistry, channel_of_type
from nervus.core._restarts import keep_running
from nervus.runtime._lease import Lease
from nervus.storage import EventStore, RecordedEvent
from nervus.transports import OutgoingMessage

log = logging.getLogger("nervus.relay")

Publish = Callable[[str, list[OutgoingMessage]], Awaitable[None]]
"""Publishes messages to a channel, retrying through outages (the service's)."""


class Relay:
    """Publishes a store's events to a transport, from a checkpoint named ``name``."""

    def __init__(
        self,
        store: EventStore,
        publish: Publish,
        *,
        name: str = "main",
        registry: TypeRegistry = REGISTRY,
        batch: int = 500,
        lease_seconds: float = 10.0,
    ) -> None:
        self.store = store
        self._publish = publish
        self.name = name
        self._registry = registry
        self.batch = batch
        self.lease_seconds = lease_seconds
        self._checkpoint = f"relay:{name}"
        self._lease = Lease(store, f"relay:{name}:lease", lease_seconds)
        self.published = 0  # events this relay published
        self.error: str | None = None

    async def acquire(self) -> bool:
        """Take or renew the lease; False while another relay holds it."""
        return await self._lease.acquire()

    async def release(self) -> None:
        """Give the lease up (on a clean stop), so another relay takes over at once."""
        await self._lease.release()

    # -- publishing ------------------------------------------------------------------

    async def publish_pending(self) -> int:
        """Publish everything stored after the checkpoint now (holding the lease);
        returns how many events were published."""
        total = 0
        while True:
            if not await self.acquire():
                return total
            position = await self.store.load_checkpoint(self._checkpoint)
            events = await self.store.read_all(position, self.batch)
            if not events:
                return total
            if await self._forward(position, events):
                total += len(events)

    async def run(self) -> None:
        """Publish events as they are stored, until cancelled."""
        try:
            await keep_running(
                self._follow, name=f"relay {self.name}", logger=log, failed=self._failed
            )
        finally:
            await asyncio.shield(self.release())

    def _failed(self, error: str) -> None:
        self.error = error

    async def _follow(self) -> None:
        while True:  # another relay holds the lease: look again now and then
            if await self.acquire():
                break
            await asyncio.sleep(self.lease_seconds / 3)
        renewed = time.monotonic()
        position = await self.store.load_checkpoint(self._checkpoint)
        async with contextlib.aclosing(self.store.subscribe(position, batch=self.batch)) as log_:
            async for events in log_:
                if time.monotonic() - renewed > self.lease_seconds / 3:
                    if not await self.acquire():
                        return  # lost the lease: wait for it again
                    renewed = time.monotonic()
                if not await self._forward(position, events):
                    return  # the checkpoint moved elsewhere: read it again
                self.error = None
                position = events[-1].position

    async def _forward(self, position: int, events: list[RecordedEvent]) -> bool:
        """Publish ``events`` (read after ``position``), then move the checkpoint."""
        per_channel: dict[str, list[OutgoingMessage]] = {}
        for recorded in events:
            envelope = recorded.envelope
            channel = channel_of_type(envelope.type, self._registry)
            message = OutgoingMessage(
                key=recorded.stream_id, headers=envelope.to_headers(), body=envelope.data
            )
            per_channel.setdefault(channel, []).append(message)
        # channels are independent: publish them side by side, each in stream order
        await asyncio.gather(*(self._publish(c, m) for c, m in per_channel.items()))
        self.published += len(events)
        async with self.store.transaction() as tx:
            return await tx.move_checkpoint(self._checkpoint, position, events[-1].position)

    async def lag(self) -> tuple[int, int]:
        """The relay's checkpoint and the store's head."""
        return await self.store.load_checkpoint(self._checkpoint), await self.store.head()
