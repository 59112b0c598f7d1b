"""Repositories: load an aggregate, run a decision, append what it decided.

``Repository.execute(aggregate_id, decide)`` loads the aggregate (its newest
snapshot, then the events after it), calls ``decide(aggregate)``, appends the
events it returns with the version it loaded as the expected version, and
retries from the load when another writer appended first (``ConcurrencyError``),
after a short random pause, at most ``max_retries`` times. A ``DomainError``
from the decision ends the call with nothing appended.

Conversations and commands delivered twice
    With ``cause`` (the message being handled), the new events join its
    conversation: its correlation id, and its id as their causation id. When the
    cause is the command message itself, ``deduplicate=True`` makes a redelivery
    harmless: if the events loaded already include one caused by that message, the
    command was executed before, and the earlier result is returned without
    deciding or appending again. (Not for a cause that may lead to several
    commands on one aggregate, such as an event whose handler executes two.)

Snapshots
    With ``snapshot_every=N``, each append that crosses a multiple of N versions
    stores a snapshot of the state; loads start from the newest snapshot whose
    ``snapshot_version`` matches the aggregate class (others are ignored).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

import msgspec

from nervus.codecs import JSON_CODEC
from nervus.core import Envelope, Event, Message, type_name
from nervus.domain._aggregate import Aggregate
from nervus.domain._decoding import EventDecoder
from nervus.errors import ConcurrencyError, ConfigurationError, StoreError
from nervus.storage import EventStore, Snapshot

A = TypeVar("A", bound=Aggregate)

Decision = Callable[[A], Iterable[Event] | Awaitable[Iterable[Event]]]
"""Takes the loaded aggregate, returns the new events (or raises ``DomainError``)."""

log = logging.getLogger("nervus.domain")


class Loaded(msgspec.Struct, Generic[A], frozen=True):
    """An aggregate as loaded: its state, its stream, its version, and the causation
    ids of the events read after the snapshot (to recognise a repeated command)."""

    aggregate: A
    stream_id: str
    version: int
    causes: frozenset[str] = frozenset()


class CommandResult(msgspec.Struct, frozen=True):
    """What a command did: the stream's version after it, the global position of its
    last event (0 when it appended nothing), and the events it appended."""

    stream_id: str
    version: int
    position: int
    events: tuple[Message, ...] = ()
    repeated: bool = False
    """The command had been executed before; nothing was appended this time."""


class Repository(Generic[A]):
    """Loads and saves aggregates of one class in an event store."""

    def __init__(
        self,
        store: EventStore,
        aggregate: type[A],
        *,
        source: str = "nervus",
        snapshot_every: int | None = None,
        max_retries: int = 10,
        decoder: EventDecoder | None = None,
    ) -> None:
        problems = []
        if snapshot_every is not None and snapshot_every < 1:
            problems.append(f"snapshot_every={snapshot_every} must be 1 or more (or None)")
        if max_retries < 0:
            problems.append(f"max_retries={max_retries} must be 0 or more")
        if problems:
            raise ConfigurationError(problems)
        self.store = store
        self.aggregate = aggregate
        self.source = source
        self.snapshot_every = snapshot_every
        self.max_retries = max_retries
        self.decoder = decoder or EventDecoder()
        self._snapshot_type = (
            f"{aggregate.__module__}.{aggregate.__qualname__}:{aggregate.snapshot_version}"
        )
        self._state_decoder = msgspec.json.Decoder(aggregate)

    def stream_id(self, aggregate_id: str) -> str:
        return self.aggregate.stream_id(aggregate_id)

    async def load(self, aggregate_id: str) -> Loaded[A]:
        """The aggregate as its stream says now (a new one when the stream is empty)."""
        stream_id = self.stream_id(aggregate_id)
        aggregate, version = await self._from_snapshot(stream_id)
        causes = set()
        for recorded in await self.store.read_stream(stream_id, from_version=version + 1):
            aggregate.apply(self.decoder.decode(recorded))
            version = recorded.version
            if recorded.causationid is not None:
                causes.add(recorded.causationid)
        return Loaded(aggregate, stream_id, version, frozenset(causes))

    async def _from_snapshot(self, stream_id: str) -> tuple[A, int]:
        if self.snapshot_every is None:
            return self.aggregate(), 0
        snapshot = await self.store.load_snapshot(stream_id)
        if snapshot is None or snapshot.type != self._snapshot_type:
            return self.aggregate(), 0
        try:
            return self._state_decoder.decode(snapshot.data), snapshot.version
        except msgspec.DecodeError as exc:
            log.warning(
                "snapshot of %s at version %d does not fit %s (%s); reading the stream instead",
                stream_id,
                snapshot.version,
                self.aggregate.__qualname__,
                exc,
            )
            return self.aggregate(), 0

    async def execute(
        self,
        aggregate_id: str,
        decide: Decision[A],
        *,
        cause: Envelope | None = None,
        deduplicate: bool = False,
    ) -> CommandResult:
        """Load, decide, append; retried from the load on a concurrent append."""
        attempt = 0
        while True:
            loaded = await self.load(aggregate_id)
            if deduplicate and cause is not None and cause.id in loaded.causes:
                return await self._earlier_result(loaded, cause)
            produced = decide(loaded.aggregate)
            if inspect.isawaitable(produced):
                produced = await produced
            events = tuple(produced)
            if not events:
                return CommandResult(loaded.stream_id, loaded.version, 0)
            envelopes = [self._envelope(e, loaded.stream_id, cause) for e in events]
            try:
                result = await self.store.append(loaded.stream_id, envelopes, loaded.version)
            except ConcurrencyError:
                attempt += 1
                if attempt > self.max_retries:
                    raise
                # writers that collided should not collide again at once
                await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))
                continue
            for event in events:
                loaded.aggregate.apply(event)
            await self._maybe_snapshot(loaded, result.version)
            return CommandResult(result.stream_id, result.version, result.position, events)

    async def _earlier_result(self, loaded: Loaded[A], cause: Envelope) -> CommandResult:
        caused = [
            r
            for r in await self.store.read_stream(loaded.stream_id, backwards=True, limit=1000)
            if r.causationid == cause.id
        ]
        version = caused[0].version if caused else loaded.version
        position = caused[0].position if caused else 0
        return CommandResult(loaded.stream_id, version, position, repeated=True)

    def _envelope(self, event: Event, stream_id: str, cause: Envelope | None) -> Envelope:
        return Envelope.new(
            type=type_name(type(event)),
            source=self.source,
            data=JSON_CODEC.encode(event),
            partitionkey=stream_id,
            cause=cause,
        )

    async def _maybe_snapshot(self, loaded: Loaded[A], version: int) -> None:
        every = self.snapshot_every
        if every is None or version // every == loaded.version // every:
            return
        snapshot = Snapshot(
            loaded.stream_id, version, self._snapshot_type, msgspec.json.encode(loaded.aggregate)
        )
        try:
            await self.store.save_snapshot(snapshot)
        except StoreError as exc:  # a snapshot is an optimisation: the append stands
            log.warning("could not store a snapshot of %s: %s", loaded.stream_id, exc)
