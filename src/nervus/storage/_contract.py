"""The event store contract: streams of events, one global log, snapshots, checkpoints.

A store keeps **streams**: the events of one thing (an order, an account), in the
order they were appended, each at a **version** (1, 2, 3 ... within its stream).
Every event also has a **position** in the store's global log of all events.

``append(stream_id, events, expected_version)``
    Appends the events, all or none, at the versions after ``expected_version``:
    ``NO_STREAM`` (0) when the stream must not exist yet, ``N`` when it must be at
    exactly version N, ``ANY`` (None) to skip the check. A stream at another
    version raises ``ConcurrencyError`` carrying the stream, the expected and the
    actual version, and writes nothing. Returns the stream's new version and the
    position of the last event appended.

    Idempotent: appending events whose ids are all stored already, in this stream
    and in this order, writes nothing and returns where they are, whatever the
    expected version (a retried command after a lost reply). An id stored
    elsewhere raises ``EventIdConflict``.

    Appends running at the same time in one process may commit in one
    transaction (group commit); each keeps its own check and its own result, and
    one failing does not fail the others.

Positions
    Positive, increasing in commit order, not necessarily consecutive. A reader
    that has seen position P has seen every event at a lower position: no event
    becomes visible later at a position below one already visible. (This is what
    lets a reader of the global log keep a single number as its checkpoint.)

Reads
    ``read_stream`` returns a stream's events from a version, forwards or
    backwards; ``read_all`` returns events after a position, in position order;
    ``subscribe`` does that in batches forever: it catches up, then waits for new
    events (woken by the database, not by polling alone), never skipping or
    repeating one.

Snapshots and checkpoints
    A snapshot is a stream's folded state at a version, stored beside the stream
    (the newest replaces older ones); a checkpoint is a named global position
    (a relay's, a projection's). Neither is an event: saving them changes no
    stream. nervus never modifies or deletes a stored event.

Transactions
    ``transaction()`` gives one database transaction in which appends, the
    caller's own SQL (read models, business tables) and checkpoint moves commit
    together or not at all. SQL uses ``?`` placeholders on every store;
    ``dialect`` says which database runs it (``sqlite`` or ``postgresql``) for
    the rare statement that differs. While a transaction that appended is open,
    other appends to the store wait for it (that keeps position order equal to
    commit order); on SQLite every other write waits. Keep transactions short.

Outbox and inbox
    For services that keep ordinary tables rather than event streams. Inside a
    transaction, ``enqueue`` adds a message to the outbox (committed with the
    caller's writes, or not at all); an outbox relay reads the unsent messages in
    the order they were enqueued (``outbox_batch``), publishes them and marks them
    sent (``outbox_sent``); sent messages are purged after a retention time.
    Messages committed late are read late, never skipped: the relay reads what is
    unsent, not what is past a position. ``record_handled`` writes a consumer
    group's processed message id to the inbox in the transaction of the handler's
    effects; a redelivered message found there (``handled``) is not handled again.

Every method may raise ``StoreUnavailable`` (retryable) when the database cannot
be reached, and ``StoreError`` for other failures, naming the database.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Final, Self

import msgspec

from nervus.core import Envelope

NO_STREAM: Final = 0
"""Expected version of a stream that must not exist yet."""

ANY: Final = None
"""Expected version that skips the concurrency check."""


class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    """An event as stored: where it is (stream, version, global position) and what it
    is (its CloudEvents attributes and ``data``). ``envelope`` gives it as an
    ``Envelope`` (built when asked: readers that only decode need ``type`` and
    ``data``), with the stream id as its partition key."""

    stream_id: str
    version: int
    position: int
    id: str
    type: str
    source: str
    time: str
    subject: str | None
    datacontenttype: str
    dataschema: str | None
    correlationid: str | None
    causationid: str | None
    traceparent: str | None
    tracestate: str | None
    data: bytes

    @property
    def envelope(self) -> Envelope:
        return Envelope(
            id=self.id,
            type=self.type,
            source=self.source,
            data=self.data,
            time=self.time,
            subject=self.subject,
            datacontenttype=self.datacontenttype,
            dataschema=self.dataschema,
            correlationid=self.correlationid,
            causationid=self.causationid,
            partitionkey=self.stream_id,
            traceparent=self.traceparent,
            tracestate=self.tracestate,
        )


class AppendResult(msgspec.Struct, frozen=True, gc=False):
    """Where an append left the stream: its version and the last event's position."""

    stream_id: str
    version: int
    position: int


class OutboxMessage(msgspec.Struct, frozen=True, gc=False):
    """A message waiting in the outbox: its place in enqueue order, where it goes,
    and what it carries."""

    id: int
    channel: str
    key: str | None
    headers: dict[str, str]
    body: bytes
    created: float  # seconds since the epoch


class Snapshot(msgspec.Struct, frozen=True):
    """A stream's state folded up to ``version``, encoded by its owner as ``type``."""

    stream_id: str
    version: int
    type: str
    data: bytes


class StoreTransaction(ABC):
    """One database transaction of a store (see "Transactions" above)."""

    dialect: str
    """``sqlite`` or ``postgresql``."""
    namespace: str
    """What to put before a table name to reach the store's own schema: ``""`` on
    SQLite, ``"<schema>."`` on PostgreSQL."""

    @abstractmethod
    async def append(
        self, stream_id: str, events: Sequence[Envelope], expected_version: int | None
    ) -> AppendResult:
        """``EventStore.append`` inside the transaction: visible once it commits. A
        refused append raises and leaves the rest of the transaction as it was."""

    @abstractmethod
    async def execute(self, sql: str, *params: object) -> int:
        """Run one statement (``?`` placeholders); returns the rows it changed."""

    @abstractmethod
    async def fetch(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """Run one query (``?`` placeholders); returns its rows as tuples."""

    @abstractmethod
    async def load_checkpoint(self, name: str) -> int:
        """The position stored under ``name`` as this transaction sees it (0: none)."""

    @abstractmethod
    async def enqueue(
        self, channel: str, key: str | None, headers: dict[str, str], body: bytes
    ) -> None:
        """Add a message to the outbox, to be published after the commit."""

    @abstractmethod
    async def record_handled(self, group: str, message_id: str) -> bool:
        """Write to the inbox that ``group`` handled ``message_id``; False (and nothing
        written) when it is there already."""

    @abstractmethod
    async def move_checkpoint(self, name: str, expected: int, position: int) -> bool:
        """Set ``name`` to ``position`` if it is at ``expected`` now (a missing
        checkpoint is at 0); False, and nothing changed, if it is not. The
        checkpoint stays locked until the transaction ends, so two transactions
        moving it from the same place cannot both succeed."""


class EventStore(ABC):
    """Streams with optimistic concurrency, a global log, snapshots and checkpoints."""

    url: str
    """Where the store is, password hidden."""
    namespace: str = ""
    """What to put before a table name to reach the store's own schema: ``""`` on
    SQLite, ``"<schema>."`` on PostgreSQL."""

    @abstractmethod
    async def connect(self) -> None:
        """Open connections and create the tables if needed (idempotent)."""

    @abstractmethod
    async def close(self) -> None:
        """Let running appends finish, then release every connection (idempotent)."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abstractmethod
    async def append(
        self, stream_id: str, events: Sequence[Envelope], expected_version: int | None
    ) -> AppendResult:
        """Append ``events`` after ``expected_version`` (see the module docstring)."""

    @abstractmethod
    async def read_stream(
        self,
        stream_id: str,
        *,
        from_version: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """Events of a stream from ``from_version`` (included): forwards from 1 by
        default, or backwards from the last version. An unknown stream is empty."""

    @abstractmethod
    async def stream_version(self, stream_id: str) -> int:
        """The stream's last version, 0 when it has no events."""

    @abstractmethod
    async def read_all(self, after: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` events with a position above ``after``, in position order."""

    @abstractmethod
    async def head(self) -> int:
        """The highest position visible now (0 when the store is empty)."""

    @abstractmethod
    def subscribe(
        self, after: int = 0, *, batch: int = 1000
    ) -> AsyncGenerator[list[RecordedEvent], None]:
        """Batches of the events after ``after``: those stored now, then new ones as
        they commit. Ends when the store is closed."""

    @abstractmethod
    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` as the stream's newest, unless a newer one is stored."""

    @abstractmethod
    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        """The stream's newest snapshot, or None."""

    @abstractmethod
    async def save_checkpoint(self, name: str, position: int) -> None:
        """Store ``position`` under ``name``."""

    @abstractmethod
    async def load_checkpoint(self, name: str) -> int:
        """The position stored under ``name``, 0 when none is."""

    @abstractmethod
    async def list_checkpoints(self, prefix: str = "") -> dict[str, int]:
        """Every checkpoint whose name starts with ``prefix``."""

    @abstractmethod
    async def outbox_batch(self, limit: int = 500) -> list[OutboxMessage]:
        """Up to ``limit`` unsent outbox messages, in the order they were enqueued."""

    @abstractmethod
    async def outbox_sent(self, ids: Sequence[int], *, at: float) -> None:
        """Mark outbox messages sent at ``at`` (seconds since the epoch)."""

    @abstractmethod
    async def outbox_purge(self, sent_before: float) -> int:
        """Delete outbox messages sent before ``sent_before``; returns how many."""

    @abstractmethod
    async def outbox_counts(self) -> tuple[int, int]:
        """How many outbox messages are unsent, and how many sent ones are kept."""

    @abstractmethod
    async def outbox_reject(self, message: OutboxMessage, reason: str, *, at: float) -> None:
        """Move an unpublishable message (the broker refused it) from the outbox to the
        outbox's dead letters, with the reason."""

    @abstractmethod
    async def outbox_dead_letters(self, limit: int = 100) -> list[tuple[OutboxMessage, str]]:
        """The newest dead letters of the outbox, with their reasons."""

    @abstractmethod
    async def handled(self, group: str, message_id: str) -> bool:
        """Whether the inbox holds ``message_id`` for ``group``."""

    @abstractmethod
    async def inbox_purge(self, before: float) -> int:
        """Delete inbox records written before ``before``; returns how many."""

    @property
    @abstractmethod
    def change_count(self) -> int:
        """Moves on whenever the store may have changed: an append or an enqueue of
        this process, or one of another process the store was told of."""

    @abstractmethod
    async def wait_for_change(self, seen: int, timeout: float) -> None:
        """Wait up to ``timeout`` s unless ``change_count`` moved past ``seen``."""

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[StoreTransaction]:
        """One transaction for appends, the caller's SQL and checkpoints; commits when
        the block ends, rolls back if it raises."""
