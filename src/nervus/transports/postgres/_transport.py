"""The PostgreSQL transport: the partitioned log, consumer groups, retries and replay
in tables of one schema, shared by consumer processes on any number of machines.

While the server is unreachable, ``publish`` and ``fetch`` raise the retryable
``TransportUnavailable`` (naming the URL without its password) as soon as the
connection is found broken, or after at most ``connect_timeout`` seconds of trying
to reconnect; they do not retry by themselves (the runtime does, with backoff).
Commits of settled positions and lease renewals are retried in the background.
One warning is logged per outage. Once the server answers, the same transport and
subscriptions carry on; see the package docstring for the details."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from psycopg import AsyncConnection

from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
from nervus.transports._contract import (
    Features,
    OutgoingMessage,
    Start,
    Subscription,
    Transport,
    ensure_open,
)
from nervus.transports.postgres import _log, _membership
from nervus.transports.postgres._database import (
    Connection,
    Publisher,
    Reachability,
    as_transport_error,
)
from nervus.transports.postgres._listen import Listener
from nervus.transports.postgres._schema import create_schema
from nervus.transports.postgres._settings import PostgresSettings, redact, split_url
from nervus.transports.postgres._subscription import PostgresSubscription

log = logging.getLogger("nervus.transports.postgres")


class PostgresTransport(Transport):
    """A durable partitioned log in PostgreSQL tables (see ``_schema``).

    Publishes running at the same time in one process are committed together (one
    transaction, one WAL flush, one notification per channel). Consumers wait on
    LISTEN/NOTIFY and, as a safety net, look again every ``poll_interval``.

    Connections: one publishes, one reads, one runs group, position and retry
    transactions, one listens.

    A replay (``start=`` other than committed) moves the group's positions when the
    subscription joins; members of the group already running keep reading from
    where they are, so replay a group while it has no other members.
    """

    features = Features(
        cross_process_groups=True, replay=True, replay_from_time=True, delayed_redelivery=True
    )

    def __init__(self, conninfo: str, settings: PostgresSettings) -> None:
        problems = settings.validate()
        if problems:
            raise ConfigurationError(problems)
        self.settings = settings
        self.url = redact(conninfo)
        self._conninfo = conninfo
        timeout = settings.connect_timeout
        self.reachability = Reachability(self.url)
        self.writer, self.reader, self.control = (
            Connection(conninfo, where=self.url, timeout=timeout, reachability=self.reachability)
            for _ in range(3)
        )
        self._publisher = Publisher(self.writer, self._append, self.notify_change)
        self._listener = Listener(
            conninfo,
            settings.notify_channel,
            timeout=timeout,
            on_notify=self._notified,
            reachability=self.reachability,
        )
        self._channels: dict[str, tuple[int, int]] = {}
        self._round_robin: dict[str, int] = {}
        self._subscriptions: set[PostgresSubscription] = set()
        self._connected = False
        self._closed = False
        self._change: asyncio.Future[None] | None = None
        self.change_version = 0

    @classmethod
    def from_url(cls, url: str, key: str = "NERVUS_TRANSPORT") -> PostgresTransport:
        """``postgresql://user:password@host:5432/database?schema=nervus&partitions=8``:
        nervus options (see ``PostgresSettings``) and libpq's connection options."""
        conninfo, settings = split_url(url, key)
        return cls(conninfo, settings)

    def __repr__(self) -> str:
        return f"PostgresTransport({self.url!r}, schema={self.settings.schema!r})"

    @property
    def publish_transactions(self) -> int:
        """Publishing transactions committed so far (fewer than publishes when they
        were committed together)."""
        return self._publisher.transactions

    # -- lifecycle --------------------------------------------------------------

    async def connect(self) -> None:
        ensure_open(self._closed, f"PostgreSQL transport on {self.url}")
        if self._connected:
            return
        limit = self.settings.connect_timeout
        try:
            async with asyncio.timeout(limit):
                async with self.control.use() as conn:
                    await create_schema(conn, self.settings.schema)
                await self.writer.open()
                await self.reader.open()
                await self._listener.start()
        except TimeoutError as exc:
            await self._close_connections(final=False)
            raise TransportUnavailable(
                f"cannot connect to PostgreSQL at {self.url} within {limit}s "
                "(connect_timeout); check the host, the port and that the server runs"
            ) from exc
        except BaseException as exc:
            await self._close_connections(final=False)
            error = as_transport_error(exc, self.url)
            if error is exc:
                raise
            raise error from exc
        self._connected = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            with contextlib.suppress(TransportError):
                await sub.close()
        await self._publisher.drain()
        self.notify_change()
        self._connected = False
        await self._close_connections()

    async def _close_connections(self, *, final: bool = True) -> None:
        await self._listener.stop()
        for conn in (self.writer, self.reader, self.control):
            await conn.close(final=final)

    def _check(self) -> None:
        ensure_open(self._closed, f"PostgreSQL transport on {self.url}")
        if not self._connected:
            raise TransportUnavailable(
                f"the PostgreSQL transport on {self.url} is not connected; "
                "await transport.connect() or use 'async with transport'"
            )

    # -- channels and publishing --------------------------------------------------

    async def ensure_channel(self, channel: str, partitions: int | None = None) -> int:
        self._check()
        return (await self._channel(channel, partitions))[1]

    async def _channel(self, channel: str, partitions: int | None = None) -> tuple[int, int]:
        known = self._channels.get(channel)
        if known is not None:
            return known
        if not channel:
            raise ConfigurationError(["a channel name must not be empty"])
        if partitions is not None and not 1 <= partitions <= 4096:
            raise ConfigurationError(
                [f"channel {channel!r}: partitions={partitions} must be between 1 and 4096"]
            )
        try:
            async with self.control.use() as conn:
                found = await _log.ensure_channel(
                    conn, self.settings.schema, channel, partitions or self.settings.partitions
                )
        except TransportError as exc:
            raise type(exc)(str(exc), channel=channel) from exc.__cause__
        self._channels[channel] = found
        return found

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        self._check()
        if not messages:
            return
        cid, count = await self._channel(channel)
        counter = self._round_robin.get(channel, 0)
        self._round_robin[channel] = counter + len(messages)
        rows = _log.pending(cid, count, counter, messages)
        try:
            await self._publisher.submit(rows)
        except TransportError as exc:
            raise type(exc)(str(exc), channel=channel) from exc.__cause__

    async def _append(self, conn: AsyncConnection[Any], publishes: list[_log.Pending]) -> None:
        await _log.append(conn, self.settings.schema, self.settings.notify_channel, publishes)

    # -- consuming --------------------------------------------------------------

    async def subscribe(
        self,
        channels: Iterable[str],
        group: str,
        *,
        max_in_flight: int = 1000,
        start: Start | None = None,
    ) -> Subscription:
        self._check()
        names = list(dict.fromkeys(channels))
        if not names:
            raise ConfigurationError([f"group {group!r}: subscribe to at least one channel"])
        if not group:
            raise ConfigurationError(["a consumer group name must not be empty"])
        found = {name: await self._channel(name) for name in names}
        if start is not None and start.kind != "committed":
            async with self.control.use() as conn:
                await _membership.move_positions(conn, self.settings.schema, group, found, start)
        member = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        sub = PostgresSubscription(self, group, found, member)
        self._subscriptions.add(sub)
        try:
            await sub.start()
        except BaseException:
            self._subscriptions.discard(sub)
            raise
        return sub

    def forget_subscription(self, sub: PostgresSubscription) -> None:
        self._subscriptions.discard(sub)

    # -- change notification ----------------------------------------------------

    def _notified(self, payload: str | None) -> None:
        if payload is not None and payload.startswith("g:"):
            generation, _, group = payload[2:].partition(":")
            with contextlib.suppress(ValueError):
                seen = int(generation)
                for sub in self._subscriptions:
                    if sub.group == group:
                        sub.group_changed(seen)
            return
        if payload is None:  # reconnected: anything may have changed
            for sub in self._subscriptions:
                sub.group_changed(math.inf)
        elif payload.startswith("c:") and payload[2:].isdigit():
            cid = int(payload[2:])
            if not any(cid in sub.channel_ids for sub in self._subscriptions):
                return  # nobody here reads that channel
        self.notify_change()

    def notify_change(self) -> None:
        """Something may have changed: waiting fetches look again."""
        self.change_version += 1
        change, self._change = self._change, None
        if change is not None and not change.done():
            change.set_result(None)

    async def wait_for_change(self, seen: int, longest: float) -> None:
        """Wait up to ``longest`` s (at most ``poll_interval``), unless a change was
        signalled since a fetch read ``change_version`` as ``seen``."""
        if self.change_version != seen or self._closed:
            return
        if self._change is None:
            self._change = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._change], timeout=min(longest, self.settings.poll_interval))
