"""The embedded transport: a durable partitioned log in one SQLite file (WAL mode)
that the processes of one machine share."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
from nervus.sql._sqlite import Checkpointer, Connection, Errors, Writer
from nervus.sql._watch import Changes
from nervus.transports._contract import (
    Features,
    OutgoingMessage,
    Start,
    Subscription,
    Transport,
    ensure_open,
    partition_for,
)
from nervus.transports._urls import parse_options
from nervus.transports.sqlite import _log, _membership
from nervus.transports.sqlite._schema import create_schema
from nervus.transports.sqlite._settings import SqliteSettings
from nervus.transports.sqlite._subscription import SqliteSubscription

log = logging.getLogger("nervus.transports.sqlite")


class SqliteTransport(Transport):
    """A partitioned log, consumer groups, retries and replay in one SQLite file.

    Publishes running at the same time are committed together (one transaction,
    one fsync). Consumers in this process are woken by local publishes; commits of
    other processes are noticed through ``PRAGMA data_version`` every
    ``poll_interval`` while someone waits.

    A replay (``start=`` other than committed) moves the group's positions when the
    subscription joins; members of the group already running keep reading from
    where they are, so replay a group while it has no other members.
    """

    features = Features(
        cross_process_groups=True, replay=True, replay_from_time=True, delayed_redelivery=True
    )

    def __init__(self, settings: SqliteSettings) -> None:
        problems = settings.validate()
        if problems:
            raise ConfigurationError(problems)
        self.settings = settings
        self.path = os.path.abspath(settings.path)
        sync, busy = settings.synchronous, settings.busy_timeout
        errors = Errors(TransportUnavailable, TransportError)
        self.reader = Connection(
            self.path, name="reader", synchronous=sync, busy_timeout=busy, errors=errors
        )
        self._checkpointer = Checkpointer(
            self.path, interval=settings.checkpoint_interval, busy_timeout=busy, errors=errors
        )
        self.writer = Writer(
            self.path,
            synchronous=sync,
            busy_timeout=busy,
            on_commit=self.notify_local,
            errors=errors,
            on_loop=settings.commit_on_loop,
        )
        self._channels: dict[str, tuple[int, int]] = {}
        self._round_robin: dict[str, int] = {}
        self._subscriptions: set[SqliteSubscription] = set()
        self._connected = False
        self._closed = False
        self._maintenance: asyncio.Task[None] | None = None
        self._changes = Changes(self.path, poll_interval=settings.poll_interval, busy_timeout=busy)

    @classmethod
    def from_url(cls, url: str, key: str = "NERVUS_TRANSPORT") -> SqliteTransport:
        """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` with options
        (see ``SqliteSettings``), e.g. ``?partitions=8&synchronous=full``."""
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise ConfigurationError([f"{key}={url!r}: expected a sqlite:/// URL"])
        if parts.netloc:
            raise ConfigurationError(
                [
                    f"{key}={url!r}: a SQLite URL has no host; write sqlite:///relative.db "
                    "or sqlite:////absolute/path.db"
                ]
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if path in ("", ":memory:"):
            raise ConfigurationError(
                [
                    f"{key}={url!r}: name a database file, e.g. sqlite:///var/nervus.db "
                    "(for an in-process log without a file use memory://)"
                ]
            )
        return cls(parse_options(url, SqliteSettings, key=key, path=path))

    # -- lifecycle --------------------------------------------------------------

    async def connect(self) -> None:
        ensure_open(self._closed, f"SQLite transport on {self.path}")
        if self._connected:
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            await self.writer.open()
            await self.reader.open()
        except (OSError, sqlite3.Error) as exc:
            await self._close_connections()
            raise TransportUnavailable(f"cannot open the SQLite log {self.path}: {exc}") from exc
        try:
            await self.writer.submit(create_schema)
        except TransportError:
            await self._close_connections()
            raise
        self._connected = True
        await self._checkpointer.start()
        if self.settings.retention_seconds is not None or self.settings.retention_bytes is not None:
            self._maintenance = asyncio.create_task(self._retention_loop())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            with contextlib.suppress(TransportError):
                await sub.close()
        self._changes.close()
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        self.notify_local()
        self._connected = False
        await self._close_connections()

    async def _close_connections(self) -> None:
        await self.writer.close()  # commits what is queued first
        await self.reader.close()
        await self._checkpointer.stop()

    @property
    def writer_open(self) -> bool:
        return self.writer.running

    def _check(self) -> None:
        ensure_open(self._closed, f"SQLite transport on {self.path}")
        if not self._connected:
            raise TransportUnavailable(
                f"the SQLite transport on {self.path} is not connected; "
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
        found = await self.writer.submit(
            functools.partial(
                _log.ensure_channel, name=channel, partitions=partitions or self.settings.partitions
            )
        )
        self._channels[channel] = found
        return found

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        self._check()
        if not messages:
            return
        cid, count = await self._channel(channel)
        counter = self._round_robin.get(channel, 0)
        self._round_robin[channel] = counter + len(messages)
        encode = _log.headers_encoder.encode
        rows = [
            (partition_for(m.key, count, counter + i), m.key, encode(m.headers), m.body)
            for i, m in enumerate(messages)
        ]
        try:
            await self.writer.submit(functools.partial(_log.append, cid=cid, messages=rows))
        except TransportError as exc:
            raise type(exc)(str(exc), channel=channel) from exc.__cause__

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
            await self.writer.submit(
                functools.partial(
                    _membership.move_positions, group=group, channels=found, start=start
                )
            )
        member = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        sub = SqliteSubscription(self, group, found, member)
        self._subscriptions.add(sub)
        try:
            await sub.start()
        except BaseException:
            self._subscriptions.discard(sub)
            raise
        return sub

    def forget_subscription(self, sub: SqliteSubscription) -> None:
        self._subscriptions.discard(sub)

    # -- change notification ----------------------------------------------------

    def notify_local(self) -> None:
        """Wake fetches waiting in this process (a local commit or settlement)."""
        self.notify_change()

    def notify_change(self) -> None:
        """Something may have changed: waiting fetches look again."""
        self._changes.notify()

    @property
    def change_version(self) -> int:
        """Moves on every change signalled; a fetch reads it before it looks."""
        return self._changes.version

    async def wait_for_change(self, seen: int, longest: float) -> None:
        """Wait up to ``longest`` s, unless a change was signalled since a fetch read
        ``change_version`` as ``seen``."""
        await self._changes.wait(seen, longest)

    # -- retention ----------------------------------------------------------------

    async def apply_retention(self) -> int:
        """Delete what is beyond ``retention_seconds`` / ``retention_bytes`` now (it also
        runs every ``retention_interval``); returns how many messages were deleted."""
        self._check()
        return await self.writer.submit(
            functools.partial(
                _log.apply_retention,
                now=time.time(),
                max_age=self.settings.retention_seconds,
                max_bytes=self.settings.retention_bytes,
            )
        )

    async def _retention_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.retention_interval)
            try:
                await self.apply_retention()
            except (TransportError, sqlite3.Error):
                log.warning("applying retention to %s failed", self.path, exc_info=True)
