"""The transactional outbox and inbox of a service.

``service.transaction()`` (or ``ctx.transaction()`` in a handler) opens one store
transaction in which the caller's own SQL, the events it publishes (written to
the outbox, not sent) and, in a handler declared with ``inbox=True``, the record
that its group handled the message, commit together or not at all.

The inbox
    Before a handler with ``inbox=True`` runs, the runtime looks for the message's
    id in the group's inbox; if it is there, the message was handled before (a
    redelivery): it is acknowledged without running the handler. A handler that
    opens a transaction records the id in it, with its effects; one that does not
    gets the id recorded after it succeeds. Two deliveries of one message racing
    each other cannot both commit: the second one's record fails, its transaction
    rolls back (``AlreadyHandled``, retryable) and the retry finds the record.

The outbox relay
    ``OutboxRelay`` publishes what transactions enqueued, in enqueue order (so a
    key's messages keep their order), marks it sent, and purges sent messages after
    ``outbox_retention``. A message the broker refuses (too large, rejected) moves
    to the outbox's dead letters with the reason and the relay goes on; while the
    broker is unreachable the relay backs off and the messages wait. One relay of
    a store works at a time (a lease); others take over when it stops renewing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from nervus.core import Envelope, Message
from nervus.core._restarts import keep_running
from nervus.errors import ConfigurationError, NervusError, TransportError
from nervus.runtime._lease import Lease
from nervus.runtime._outgoing import encode
from nervus.storage import AppendResult, EventStore, OutboxMessage, StoreTransaction
from nervus.transports import OutgoingMessage

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from nervus.runtime._sqlalchemy import AsyncSessionOfTransaction, SessionOfTransaction

log = logging.getLogger("nervus.outbox")

Publish = Callable[[str, list[OutgoingMessage]], Awaitable[None]]


class AlreadyHandled(NervusError):
    """The message was handled by another delivery meanwhile; the transaction was
    rolled back. A retry acknowledges it without running the handler."""

    retryable = True

    def __init__(self, group: str, message_id: str) -> None:
        self.group = group
        self.message_id = message_id
        super().__init__(f"group {group!r} has handled message {message_id!r} already")


class ServiceTransaction:
    """One transaction of a service: its SQL, its published events, its inbox record,
    and the writes of a SQLAlchemy session in it (``sqlalchemy()``,
    ``sqlalchemy_async()``)."""

    def __init__(
        self,
        tx: StoreTransaction,
        *,
        source: str,
        cause: Envelope | None,
        store: EventStore,
    ) -> None:
        self.store_transaction = tx
        self._source = source
        self._cause = cause
        self._store = store
        self.dialect = tx.dialect
        self.namespace = tx.namespace
        self.published = 0
        self._orm: SessionOfTransaction | AsyncSessionOfTransaction | None = None

    async def execute(self, sql: str, *params: object) -> int:
        """Run one statement (``?`` placeholders); returns the rows it changed."""
        return await self.store_transaction.execute(sql, *params)

    async def fetch(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """Run one query (``?`` placeholders); returns its rows."""
        return await self.store_transaction.fetch(sql, *params)

    async def publish(
        self, event: Message, *, key: str | None = None, subject: str | None = None
    ) -> None:
        """Publish ``event`` if, and once, the transaction commits (through the outbox).
        In a handler it joins the handled message's conversation."""
        channel, message = encode(
            event, source=self._source, key=key, subject=subject, cause=self._cause
        )
        await self.store_transaction.enqueue(channel, message.key, message.headers, message.body)
        self.published += 1

    async def append(
        self, stream_id: str, events: Sequence[Envelope], expected_version: int | None
    ) -> AppendResult:
        """Append to an event stream in the same transaction."""
        return await self.store_transaction.append(stream_id, events, expected_version)

    def sqlalchemy(self) -> Session:
        """A SQLAlchemy ``Session`` whose statements run in this transaction (SQLite;
        on PostgreSQL use ``sqlalchemy_async``). Its writes commit with the
        transaction or not at all: ``session.commit()`` releases a savepoint, not the
        transaction, and what is pending when the block ends is flushed before the
        transaction commits. Every call in one transaction returns the same session."""
        try:
            from nervus.runtime._sqlalchemy import SessionOfTransaction
        except ImportError as exc:
            raise self._no_sqlalchemy(exc) from exc
        if self._orm is None:
            self._orm = SessionOfTransaction(self._store, self.store_transaction)
        elif not isinstance(self._orm, SessionOfTransaction):
            raise ConfigurationError(["store: this transaction has an AsyncSession already"])
        return self._orm.session

    async def sqlalchemy_async(self) -> AsyncSession:
        """A SQLAlchemy ``AsyncSession`` whose statements run in this transaction
        (PostgreSQL; on SQLite use ``sqlalchemy``), ending with it as ``sqlalchemy``
        says. Tables whose metadata names no schema are in the store's schema."""
        try:
            from nervus.runtime._sqlalchemy import AsyncSessionOfTransaction
        except ImportError as exc:
            raise self._no_sqlalchemy(exc) from exc
        if self._orm is None:
            self._orm = await AsyncSessionOfTransaction.open(self._store, self.store_transaction)
        elif not isinstance(self._orm, AsyncSessionOfTransaction):
            raise ConfigurationError(["store: this transaction has a Session already"])
        return self._orm.session

    @staticmethod
    def _no_sqlalchemy(exc: ImportError) -> ConfigurationError:
        return ConfigurationError(
            [f"sqlalchemy: cannot be imported ({exc}): pip install 'nervus[sqlalchemy]'"]
        )

    async def _end(self, failed: bool) -> None:
        """Before the store transaction ends: flush and close the session, if any."""
        if self._orm is not None:
            orm, self._orm = self._orm, None
            await orm.end(failed)


@contextlib.asynccontextmanager
async def open_transaction(
    store: EventStore,
    *,
    source: str,
    cause: Envelope | None,
    inbox: tuple[str, str] | None,
) -> AsyncIterator[ServiceTransaction]:
    """A service transaction; ``inbox`` is (group, message id) to record in it."""
    async with store.transaction() as tx:
        if inbox is not None and not await tx.record_handled(*inbox):
            raise AlreadyHandled(*inbox)
        transaction = ServiceTransaction(tx, source=source, cause=cause, store=store)
        try:
            yield transaction
        except BaseException:
            await transaction._end(failed=True)
            raise
        await transaction._end(failed=False)


class Inbox:
    """The inbox checks of one service's consumers, and how many duplicates they
    suppressed."""

    def __init__(self, store: Callable[[], EventStore]) -> None:
        self._store = store
        self.duplicates = 0

    async def seen(self, group: str, message_id: str) -> bool:
        return await self._store().handled(group, message_id)

    async def record(self, group: str, message_id: str) -> None:
        async with self._store().transaction() as tx:
            await tx.record_handled(group, message_id)


class OutboxRelay:
    """Publishes a store's outbox to a transport (see the module docstring)."""

    def __init__(
        self,
        store: EventStore,
        publish: Publish,
        *,
        batch: int = 500,
        lease_seconds: float = 10.0,
        retention: float = 3600.0,
        purge_interval: float = 60.0,
    ) -> None:
        self.store = store
        self._publish = publish
        self.batch = batch
        self.retention = retention
        self.purge_interval = purge_interval
        self._lease = Lease(store, "outbox:lease", lease_seconds)
        self.published = 0
        self.rejected = 0
        self.error: str | None = None

    async def publish_pending(self) -> int:
        """Publish what is in the outbox now (holding the lease); returns how many."""
        total = 0
        while await self._lease.acquire():
            messages = await self.store.outbox_batch(self.batch)
            if not messages:
                break
            total += await self._forward(messages)
        return total

    async def run(self) -> None:
        """Publish as transactions commit, until cancelled."""
        try:
            await keep_running(self._follow, name="outbox relay", logger=log, failed=self._failed)
        finally:
            await asyncio.shield(self._lease.release())

    def _failed(self, error: str) -> None:
        self.error = error

    async def _follow(self) -> None:
        lease = self._lease
        while True:  # another relay holds the lease: look again now and then
            if await lease.acquire():
                break
            await asyncio.sleep(lease.seconds / 3)
        renewed = purged = time.monotonic()
        while True:
            now = time.monotonic()
            if now - renewed > lease.seconds / 3:
                if not await lease.acquire():
                    return
                renewed = now
            if now - purged > self.purge_interval:
                await self.store.outbox_purge(time.time() - self.retention)
                purged = now
            seen = self.store.change_count
            messages = await self.store.outbox_batch(self.batch)
            if messages:
                await self._forward(messages)
                self.error = None
                if len(messages) == self.batch:
                    continue  # more may be waiting
            # what committed before ``seen`` was read; a commit since then has moved
            # the count, and the wait returns at once
            await self.store.wait_for_change(seen, lease.seconds / 3)

    async def _forward(self, messages: list[OutboxMessage]) -> int:
        """Publish ``messages`` (one call per channel, in order), mark them sent."""
        per_channel: dict[str, list[OutboxMessage]] = {}
        for m in messages:
            per_channel.setdefault(m.channel, []).append(m)
        results = await asyncio.gather(
            *(self._channel(c, ms) for c, ms in per_channel.items()), return_exceptions=True
        )
        sent = [
            m.id
            for ok, (_, ms) in zip(results, per_channel.items(), strict=True)
            if ok is True
            for m in ms
        ]
        await self.store.outbox_sent(sent, at=time.time())
        self.published += len(sent)
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the broker is down: what was sent is marked, the rest waits
        return len(sent)

    async def _channel(self, channel: str, messages: list[OutboxMessage]) -> bool:
        try:
            await self._publish(channel, [_outgoing(m) for m in messages])
            return True
        except TransportError as exc:
            if exc.retryable:
                raise
        # the broker refused the batch: find the message(s) it refuses, one at a time
        for message in messages:
            try:
                await self._publish(channel, [_outgoing(message)])
            except TransportError as exc:
                if exc.retryable:
                    raise
                log.error(
                    "the broker refused outbox message %d (%s) on %r: %s; moved to the "
                    "outbox's dead letters",
                    message.id,
                    message.headers.get("ce_type", "?"),
                    channel,
                    exc,
                )
                await self.store.outbox_reject(message, str(exc), at=time.time())
                self.rejected += 1
            else:
                await self.store.outbox_sent([message.id], at=time.time())
                self.published += 1
        return False  # handled one by one above


def _outgoing(message: OutboxMessage) -> OutgoingMessage:
    return OutgoingMessage(key=message.key, headers=message.headers, body=message.body)
