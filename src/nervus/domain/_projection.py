"""Projections: read models kept up to date from the global log, in SQL.

A projection declares its tables and one handler per event type it reads::

    class OrderHistory(Projection):
        name = "order-history"
        tables = {
            "order_history": "CREATE TABLE {order_history} "
            "(order_id TEXT PRIMARY KEY, status TEXT NOT NULL, total_cents INTEGER NOT NULL)",
        }

        @handles
        async def placed(self, event: OrderPlaced, tx: ReadModelTransaction) -> None:
            await tx.execute(
                "INSERT INTO {order_history} VALUES (?, 'placed', ?)",
                event.order_id, event.total_cents,
            )

``{order_history}`` in SQL names the table the handler writes (the generation being
built); readers query the view of the same name (``runner.table("order_history")``),
which always shows a complete generation.

Exactly once
    ``ProjectionRunner`` applies events in batches, each in one store transaction
    that first moves the projection's checkpoint from where the batch began to its
    last position (compare-and-set, locking the checkpoint), then runs the
    handlers. The read-model changes and the checkpoint commit together: a crash
    at any point leaves both before the batch or both after it, so no event is
    applied twice or skipped. Two runners of one projection (two processes) cannot
    both apply a batch: the second one's compare-and-set fails and it reads again
    from the new checkpoint.

Event types
    Events of types the projection does not handle are passed over without being
    decoded. A stored type that nothing in the process knows (no class, no
    upcaster: removed from the code) stops the projection with an error naming the
    type and the stream, unless ``skip_unknown`` is set. A handler that raises
    rolls its batch back; the runner retries after a pause (doubling up to 30 s)
    and ``status()`` reports the error meanwhile.

Rebuilds
    ``rebuild()`` creates the next generation of the tables, replays the log from
    the start into it (while the live generation keeps being updated), then in one
    transaction points the views at the new generation, makes it live and drops the
    old tables. Readers of the views never see a missing or half-built table; a
    runner applying a batch to the old generation at that moment rolls back and
    continues on the new one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import typing
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import msgspec

from nervus.core import Message, type_name
from nervus.core._restarts import keep_running
from nervus.domain._decoding import EventDecoder
from nervus.errors import ConfigurationError, NervusError, UnknownEventType
from nervus.storage import EventStore, RecordedEvent, StoreTransaction

F = TypeVar("F", bound=Callable[..., Awaitable[None]])

log = logging.getLogger("nervus.projections")

_HANDLES = "__nervus_handles__"
_TABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,100}$")
_TABLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")


def handles(fn: F) -> F:
    """Mark ``async def handler(self, event: SomeEvent, tx: ReadModelTransaction)``."""
    setattr(fn, _HANDLES, True)
    return fn


class ReadModelTransaction:
    """What a projection's handler writes through: SQL with ``?`` placeholders and
    ``{table}`` names, in the transaction of the batch."""

    def __init__(self, tx: StoreTransaction, tables: dict[str, str]) -> None:
        self._tx = tx
        self._tables = tables
        self._formatted: dict[str, str] = {}
        self.dialect = tx.dialect
        self.recorded: RecordedEvent | None = None
        """The stored event being applied (its stream, version, position, envelope)."""

    def sql(self, sql: str) -> str:
        """``sql`` with each ``{table}`` replaced by the table being written."""
        done = self._formatted.get(sql)
        if done is None:
            done = _TABLE.sub(lambda m: self._tables.get(m.group(1), m.group(0)), sql)
            self._formatted[sql] = done
        return done

    async def execute(self, sql: str, *params: object) -> int:
        return await self._tx.execute(self.sql(sql), *params)

    async def fetch(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        return await self._tx.fetch(self.sql(sql), *params)


Handler = Callable[[Any, Any, ReadModelTransaction], Awaitable[None]]


class Projection:
    """Base of projections: set ``name`` and ``tables``, mark handlers with ``@handles``."""

    name: ClassVar[str] = ""
    tables: ClassVar[dict[str, str]] = {}
    """Logical table name -> ``CREATE TABLE {name} (...)`` (more statements, such as
    indexes, may follow, separated by ``;``)."""
    skip_unknown: ClassVar[bool] = False
    """Pass over stored events whose type nothing in the process knows."""

    def handlers(self) -> dict[type[Message], Handler]:
        """The handler of each event class, from the ``@handles`` methods."""
        cls = type(self)
        found: dict[type[Message], Handler] = {}
        problems: list[str] = []
        if not _NAME.match(cls.name):
            problems.append(
                f"{cls.__qualname__}.name={cls.name!r}: give the projection a name of "
                "lower-case letters, digits, '.', '_' or '-'"
            )
        for table in cls.tables:
            if not _TABLE_NAME.match(table):
                problems.append(
                    f"{cls.__qualname__}.tables: {table!r} must be lower-case letters, "
                    "digits and '_', up to 41 characters"
                )
        for klass in reversed(cls.__mro__):
            for attr, fn in vars(klass).items():
                if not getattr(fn, _HANDLES, False):
                    continue
                try:
                    hints = typing.get_type_hints(fn)
                except Exception as exc:
                    problems.append(f"{cls.__qualname__}.{attr}: cannot read annotations ({exc})")
                    continue
                params = [p for p in hints if p != "return"]
                event_type = hints[params[0]] if params else None
                if not (isinstance(event_type, type) and issubclass(event_type, Message)):
                    problems.append(
                        f"{cls.__qualname__}.{attr}: a @handles method takes an annotated event "
                        f"and the transaction, e.g. async def {attr}(self, event: OrderPlaced, "
                        "tx: ReadModelTransaction) -> None"
                    )
                    continue
                found[event_type] = fn
        if problems:
            raise ConfigurationError(problems)
        return found


class ProjectionStatus(msgspec.Struct, frozen=True):
    """Where a projection is: its live generation, the position it has applied, the
    store's head, how far behind it is (in positions), and its last error."""

    name: str
    generation: int
    position: int
    head: int
    lag: int
    error: str | None = None


class ProjectionRunner:
    """Keeps one projection's read model up to date from a store's global log."""

    def __init__(
        self,
        store: EventStore,
        projection: Projection,
        *,
        decoder: EventDecoder | None = None,
        batch: int = 500,
    ) -> None:
        self.store = store
        self.projection = projection
        self.name = projection.name
        self.decoder = decoder or EventDecoder()
        self.batch = batch
        self._handlers = projection.handlers()
        self._by_type_name = {type_name(cls): fn for cls, fn in self._handlers.items()}
        self._live_key = f"projection:{self.name}:live"
        self.error: str | None = None
        self.applied = 0  # events applied by this runner

    def _position_key(self, generation: int) -> str:
        return f"projection:{self.name}:g{generation}"

    def table(self, logical: str) -> str:
        """The view readers query for the table ``logical`` (schema-qualified on
        PostgreSQL)."""
        return f"{self.store.namespace}{logical}"

    def _physical(self, namespace: str, generation: int) -> dict[str, str]:
        return {t: f"{namespace}{t}_g{generation}" for t in self.projection.tables}

    # -- setting up, and generations ----------------------------------------------

    async def setup(self) -> int:
        """Create the first generation and its views if the projection is new;
        returns the live generation."""
        live = await self.store.load_checkpoint(self._live_key)
        if live:
            return live
        async with self.store.transaction() as tx:
            if await tx.load_checkpoint(self._live_key):
                return await tx.load_checkpoint(self._live_key)
            await self._create_tables(tx, 1)
            await self._point_views(tx, 1)
            await tx.move_checkpoint(self._live_key, 0, 1)
        return 1

    async def _create_tables(self, tx: StoreTransaction, generation: int) -> None:
        physical = self._physical(tx.namespace, generation)
        for logical, ddl in self.projection.tables.items():
            await tx.execute(f"DROP TABLE IF EXISTS {physical[logical]}")
            for statement in ddl.split(";"):
                if statement.strip():
                    await tx.execute(
                        _TABLE.sub(lambda m: physical.get(m.group(1), m.group(0)), statement)
                    )

    async def _point_views(self, tx: StoreTransaction, generation: int) -> None:
        physical = self._physical(tx.namespace, generation)
        for logical in self.projection.tables:
            view = f"{tx.namespace}{logical}"
            await tx.execute(f"DROP VIEW IF EXISTS {view}")
            await tx.execute(f"CREATE VIEW {view} AS SELECT * FROM {physical[logical]}")

    # -- applying -----------------------------------------------------------------

    async def catch_up(self) -> int:
        """Apply everything stored now; returns how many events were applied."""
        generation = await self.setup()
        applied = 0
        while True:
            position = await self.store.load_checkpoint(self._position_key(generation))
            events = await self.store.read_all(position, self.batch)
            if not events:
                return applied
            outcome = await self._apply(generation, position, events, live=True)
            if outcome is None:
                generation = await self.setup()
                continue
            applied += outcome

    async def run(self) -> None:
        """Apply events as they are stored, until cancelled."""
        await keep_running(
            self._follow, name=f"projection {self.name}", logger=log, failed=self._failed
        )

    def _failed(self, error: str) -> None:
        self.error = error

    async def _follow(self) -> None:
        generation = await self.setup()
        position = await self.store.load_checkpoint(self._position_key(generation))
        async with contextlib.aclosing(self.store.subscribe(position, batch=self.batch)) as log_:
            async for events in log_:
                outcome = await self._apply(generation, position, events, live=True)
                if outcome is None:
                    return  # someone else moved the checkpoint or the generation: look again
                self.error = None
                position = events[-1].position

    async def _apply(
        self, generation: int, position: int, events: list[RecordedEvent], *, live: bool
    ) -> int | None:
        """Apply ``events`` to ``generation`` in one transaction; None when the
        checkpoint was not at ``position`` (or the generation is no longer live)."""
        relevant = [(r, fn) for r in events if (fn := self._handler_for(r)) is not None]
        async with self.store.transaction() as tx:
            if live and await tx.load_checkpoint(self._live_key) != generation:
                return None
            moved = await tx.move_checkpoint(
                self._position_key(generation), position, events[-1].position
            )
            if not moved:
                return None
            if relevant:
                model = ReadModelTransaction(tx, self._physical(tx.namespace, generation))
                for recorded, fn in relevant:
                    model.recorded = recorded
                    await fn(self.projection, self.decoder.decode(recorded), model)
        self.applied += len(relevant)
        return len(relevant)

    def _handler_for(self, recorded: RecordedEvent) -> Handler | None:
        name = recorded.type
        fn = self._by_type_name.get(name)
        if fn is not None:
            return fn
        upcasters, registry = self.decoder.upcasters, self.decoder.registry
        chain = upcasters.chain(name)
        for step in chain[1:]:
            fn = self._by_type_name.get(step)
            if fn is not None:
                return fn
        if registry.get(chain[-1]) is None and not self.projection.skip_unknown:
            raise UnknownEventType(
                chain[-1], registry.names(), stream_id=recorded.stream_id, version=recorded.version
            )
        return None

    # -- rebuilding and status ----------------------------------------------------

    async def rebuild(self) -> int:
        """Replay the whole log into a new generation and swap it in; returns it."""
        live = await self.setup()
        target = live + 1
        async with self.store.transaction() as tx:
            await self._create_tables(tx, target)
            key = self._position_key(target)
            await tx.move_checkpoint(key, await tx.load_checkpoint(key), 0)
        position = 0
        while True:
            events = await self.store.read_all(position, self.batch)
            if not events:
                break
            if await self._apply(target, position, events, live=False) is None:
                raise NervusError(
                    f"projection {self.name}: generation {target} is being rebuilt elsewhere"
                )
            position = events[-1].position
        async with self.store.transaction() as tx:
            if not await tx.move_checkpoint(self._live_key, live, target):
                raise NervusError(
                    f"projection {self.name}: the live generation changed during the rebuild"
                )
            await self._point_views(tx, target)
            for table in self._physical(tx.namespace, live).values():
                await tx.execute(f"DROP TABLE IF EXISTS {table}")
        log.info("projection %s rebuilt as generation %d", self.name, target)
        return target

    async def status(self) -> ProjectionStatus:
        generation = await self.store.load_checkpoint(self._live_key)
        position = (
            await self.store.load_checkpoint(self._position_key(generation)) if generation else 0
        )
        head = await self.store.head()
        return ProjectionStatus(
            self.name, generation, position, head, max(head - position, 0), self.error
        )


async def projection_statuses(store: EventStore) -> list[ProjectionStatus]:
    """The status of every projection that ever ran on ``store`` (from its checkpoints)."""
    checkpoints = await store.list_checkpoints("projection:")
    head = await store.head()
    statuses = []
    for key, generation in sorted(checkpoints.items()):
        name, _, kind = key.removeprefix("projection:").rpartition(":")
        if kind != "live":
            continue
        position = checkpoints.get(f"projection:{name}:g{generation}", 0)
        statuses.append(ProjectionStatus(name, generation, position, head, max(head - position, 0)))
    return statuses
