"""The Redis Streams transport: one stream per partition, consumer groups with
partition ownership by lease, delayed redelivery in sorted sets, replay by
moving a group's last delivered id.

What "accepted" means: ``publish`` returns once Redis has applied every XADD of the
batch. Concurrent ``publish`` calls share round trips (group commit): while one
pipeline is in flight, the calls that arrive wait and then go together in the next,
each getting its own outcome (an XADD refused fails its call alone). The XADDs go
through the ``APPEND`` script, up to 1,000 per call of it, which answers once for
all of them: a pipeline of plain XADDs would cost the client a reply each (about
20 µs in redis-py, several times the rest of publishing). A caller cancelled while
it waits does not take its messages back: they may still be written. Whether that survives a
crash is the server's persistence setting: with ``appendonly yes`` and
``appendfsync always`` every accepted write is on disk; with ``everysec`` (the
usual setting) a crash of the Redis process loses nothing, a power loss up to
about a second; without the append-only file only what the last RDB snapshot
holds survives a restart. ``wait_aof=true`` makes the guarantee explicit instead
of configured: the pipeline ends with ``WAITAOF`` and ``publish`` returns only
once the batch is in the append-only file on disk (and on ``wait_replicas``
replicas), failing if that did not happen within ``wait_timeout``. Replicated
setups without ``wait_aof`` can ask for ``WAIT`` on ``wait_replicas`` replicas.
``nack`` waits the same way. ``connect()`` logs a warning when the server keeps
no append-only file.

When the server goes away: a call that cannot reach it raises
``TransportUnavailable`` (retryable, naming the URL without its password) instead
of retrying inside the transport, so ``publish`` fails within ``connect_timeout``
when nothing accepts the connection and within ``command_timeout`` when the
server accepts it but does not answer; the runtime's publishing retries with
backoff up to ``publish_timeout``. ``fetch`` raises the same error (the runtime's
consumer retries it with backoff); a subscription keeps its settlements and sends
them again with growing delays, and its heartbeat keeps trying, so its lease is
renewed as soon as the server answers (a member whose lease ran out meanwhile
fetches nothing until then). The first failure of an outage logs one warning
naming the URL and the error and closes the client's idle pooled connections
(which lead to the old server process); the first successful call afterwards logs
that the server is reachable again. Nothing needs reopening: the client connects
again on the next call. A server that comes back without its data (no
persistence) has lost its consumer groups: a subscription that finds its group
missing creates it again, reading those streams from their beginning, and logs a
warning; what the server lost (unconsumed entries, pending retries) is gone.

See ``_layout`` for the keys and the offset of a stream id, ``_subscription`` for
groups, and ``RedisSettings`` for the options.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import RedisError, ResponseError

from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
from nervus.sql._batch import GroupCommit
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
from nervus.transports.redis._client import Connection, redact
from nervus.transports.redis._layout import SEQ_BITS, Keys, append_args, id_before
from nervus.transports.redis._scripts import APPEND
from nervus.transports.redis._settings import RedisSettings
from nervus.transports.redis._subscription import RedisSubscription

log = logging.getLogger("nervus.transports.redis")


_APPEND_LONGEST = 1000  # messages per APPEND script: the server does nothing else meanwhile


class _Publish:
    """One ``publish`` call waiting for a pipeline: the stream of each message and the
    ``APPEND`` arguments of each (four per message)."""

    __slots__ = ("args", "channel", "streams")

    def __init__(self, channel: str, streams: list[str], args: list[bytes]) -> None:
        self.channel = channel
        self.streams = streams
        self.args = args


class RedisTransport(Transport):
    """Channels as partitioned Redis streams, groups as Redis consumer groups.

    A Redis consumer group alone hands the entries of one stream to any of its
    consumers; nervus adds partition ownership on top (see ``_subscription``), so
    each partition has one member at a time and keeps its order.

    A replay (``start=`` other than committed) moves the group's positions when the
    subscription joins; members of the group already running keep reading from
    where they are, so replay a group while it has no other members.
    """

    features = Features(
        cross_process_groups=True, replay=True, replay_from_time=True, delayed_redelivery=True
    )

    def __init__(self, settings: RedisSettings) -> None:
        problems = settings.validate()
        if problems:
            raise ConfigurationError(problems)
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.where = redact(settings.address)
        self._connection: Connection | None = None
        self._channels: dict[str, int] = {}
        self._round_robin: dict[str, int] = {}
        self._subscriptions: set[RedisSubscription] = set()
        self._closed = False
        self._publisher: GroupCommit[_Publish, None] = GroupCommit(
            self._send, interrupted=self._interrupted
        )

    @classmethod
    def from_url(cls, url: str, key: str = "NERVUS_TRANSPORT") -> RedisTransport:
        """``redis://[user:password@]host:port/db?option=value`` (``rediss://`` for TLS);
        options in ``RedisSettings``, e.g. ``?partitions=8&maxlen=1000000``."""
        parts = urlsplit(url)
        shown = redact(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError([f"{key}={shown!r}: expected a redis:// or rediss:// URL"])
        if not parts.hostname:
            raise ConfigurationError(
                [f"{key}={shown!r}: name the server, e.g. redis://127.0.0.1:6379/0"]
            )
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ConfigurationError(
                [f"{key}={shown!r}: the path is the database number, e.g. /0; got {parts.path!r}"]
            )
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ConfigurationError([f"{key}={shown!r}: {exc}"]) from exc
        server = urlunsplit((parts.scheme, parts.netloc, f"/{db or 0}", "", ""))
        return cls(parse_options(url, RedisSettings, key=key, address=server))

    # -- lifecycle --------------------------------------------------------------

    async def connect(self) -> None:
        ensure_open(self._closed, f"Redis transport on {self.where}")
        if self._connection is not None:
            return
        connection = Connection(self.settings)
        await connection.open()
        if not connection.aof_enabled:
            log.warning(
                "Redis at %s keeps no append-only file: published messages survive a restart "
                "only as far as the last RDB snapshot",
                self.where,
            )
        self._connection = connection

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._publisher.drain()
        for sub in list(self._subscriptions):
            with contextlib.suppress(TransportError):
                await sub.close()
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    @property
    def connection(self) -> Connection:
        """The open connection; raises ``TransportClosed`` or ``TransportUnavailable``."""
        ensure_open(self._closed, f"Redis transport on {self.where}")
        if self._connection is None:
            raise TransportUnavailable(
                f"the Redis transport on {self.where} is not connected; "
                "await transport.connect() or use 'async with transport'"
            )
        return self._connection

    @property
    def publish_pipelines(self) -> int:
        """Pipelines ``publish`` sent so far: fewer than the calls when concurrent calls
        shared them."""
        return self._publisher.groups

    # -- channels and publishing --------------------------------------------------

    async def ensure_channel(self, channel: str, partitions: int | None = None) -> int:
        connection = self.connection
        known = self._channels.get(channel)
        if known is not None:
            return known
        if not channel:
            raise ConfigurationError(["a channel name must not be empty"])
        if partitions is not None and not 1 <= partitions <= 4096:
            raise ConfigurationError(
                [f"channel {channel!r}: partitions={partitions} must be between 1 and 4096"]
            )
        key = self.keys.channel(channel)
        try:
            pipe = connection.client.pipeline(transaction=False)
            pipe.set(key, partitions or self.settings.partitions, nx=True)
            pipe.get(key)
            _, found = await pipe.execute()
        except RedisError as exc:
            raise connection.failed(exc, "reading the partition count", channel=channel) from exc
        count = int(found)
        self._channels[channel] = count
        return count

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        self.connection  # noqa: B018 - raises when closed or not connected
        if not messages:
            return
        count = await self.ensure_channel(channel)
        counter = self._round_robin.get(channel, 0)
        self._round_robin[channel] = counter + len(messages)
        partitions = [self.keys.stream(channel, p) for p in range(count)]
        streams: list[str] = []
        args: list[bytes] = []
        for i, m in enumerate(messages):
            streams.append(partitions[partition_for(m.key, count, counter + i)])
            args += append_args(m.key, m.headers, m.body)
        await self._publisher.submit(_Publish(channel, streams, args))

    async def _send(self, publishes: Sequence[_Publish]) -> list[TransportError | None]:
        """Append the messages of every waiting ``publish`` call in one pipeline of
        ``APPEND`` scripts (ending with the durability wait, if any); the outcome of
        each call (None: accepted)."""
        connection = self._connection
        if connection is None:  # closed meanwhile
            return [self._interrupted() for _ in publishes]
        settings = self.settings
        trim: tuple[bytes | str | int, ...] = (b"", b"")
        if settings.maxlen is not None:
            trim = (b"MAXLEN", settings.maxlen)
        elif settings.retention_seconds is not None:
            oldest = int((time.time() - settings.retention_seconds) * 1000)
            trim = (b"MINID", f"{max(oldest, 0)}-0")
        streams = [s for p in publishes for s in p.streams]
        args = [a for p in publishes for a in p.args]
        pipe = connection.client.pipeline(transaction=False)
        for at in range(0, len(streams), _APPEND_LONGEST):
            keys = streams[at : at + _APPEND_LONGEST]
            pipe.execute_command(
                "EVAL", APPEND, len(keys), *keys, *trim, *args[at * 4 : (at + len(keys)) * 4]
            )
        waits = settings.wait_aof or settings.wait_replicas > 0
        self.add_durability_wait(pipe)
        try:
            results = await pipe.execute(raise_on_error=False)
        except RedisError as exc:  # the connection failed: every call fails with it
            return [
                _caused(connection.failed(exc, _publishing(p), channel=p.channel), exc)
                for p in publishes
            ]
        connection.reached()
        waited = results.pop() if waits else None
        appended: list[Any] = []  # per message: its entry id or its error
        for at, result in zip(range(0, len(streams), _APPEND_LONGEST), results, strict=True):
            if isinstance(result, list):
                appended += result
            else:  # the script was refused as a whole (e.g. out of memory)
                appended += [result] * len(streams[at : at + _APPEND_LONGEST])
        outcomes: list[TransportError | None] = []
        at = 0
        for p in publishes:
            what = _publishing(p)
            mine = appended[at : at + len(p.streams)]
            at += len(p.streams)
            failed = next((r for r in mine if isinstance(r, Exception)), None)
            if failed is None and isinstance(waited, Exception):
                failed = waited
            if failed is not None:
                outcomes.append(_caused(connection.failed(failed, what, channel=p.channel), failed))
                continue
            if waits:
                try:
                    self.check_durability_wait(waited, what, p.channel)
                except TransportError as exc:
                    outcomes.append(exc)
                    continue
            outcomes.append(None)
        return outcomes

    def _interrupted(self) -> TransportError:
        return TransportUnavailable(
            f"publishing to Redis at {self.where} was interrupted (the event loop is closing); "
            "the messages may or may not have been written"
        )

    def add_durability_wait(self, pipe: Any) -> None:
        """End a pipeline with the wait ``wait_aof`` / ``wait_replicas`` ask for."""
        settings = self.settings
        timeout = int(settings.wait_timeout * 1000)
        if settings.wait_aof:
            pipe.execute_command("WAITAOF", 1, settings.wait_replicas, timeout)
        elif settings.wait_replicas:
            pipe.execute_command("WAIT", settings.wait_replicas, timeout)

    def check_durability_wait(self, result: Any, what: str, channel: str | None) -> None:
        """Fail when the wait ending a pipeline fell short."""
        settings = self.settings
        if settings.wait_aof:
            local, replicas = (int(v) for v in result)
            if local < 1 or replicas < settings.wait_replicas:
                raise TransportError(
                    f"{what}: Redis at {self.where} wrote the change to {local} local and "
                    f"{replicas} replica append-only files within wait_timeout="
                    f"{settings.wait_timeout}s; wanted 1 and {settings.wait_replicas}",
                    channel=channel,
                )
        elif settings.wait_replicas and int(result) < settings.wait_replicas:
            raise TransportError(
                f"{what}: only {int(result)} of wait_replicas={settings.wait_replicas} replicas "
                f"of Redis at {self.where} acknowledged within wait_timeout="
                f"{settings.wait_timeout}s",
                channel=channel,
            )

    # -- consuming --------------------------------------------------------------

    async def subscribe(
        self,
        channels: Iterable[str],
        group: str,
        *,
        max_in_flight: int = 1000,
        start: Start | None = None,
    ) -> Subscription:
        connection = self.connection
        names = list(dict.fromkeys(channels))
        if not names:
            raise ConfigurationError([f"group {group!r}: subscribe to at least one channel"])
        if not group:
            raise ConfigurationError(["a consumer group name must not be empty"])
        counts = {name: await self.ensure_channel(name) for name in names}
        await self._create_groups(connection, group, counts)
        if start is not None and start.kind != "committed":
            await self._move_positions(connection, group, counts, start)
        member = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        sub = RedisSubscription(self, connection, group, counts, member, max(max_in_flight, 1))
        self._subscriptions.add(sub)
        try:
            await sub.start()
        except BaseException:
            self._subscriptions.discard(sub)
            raise
        return sub

    def forget_subscription(self, sub: RedisSubscription) -> None:
        self._subscriptions.discard(sub)

    async def _create_groups(
        self, connection: Connection, group: str, counts: dict[str, int]
    ) -> None:
        """Create the group on every partition's stream, reading from the beginning."""
        pipe = connection.client.pipeline(transaction=False)
        for name, count in counts.items():
            for p in range(count):
                pipe.xgroup_create(self.keys.stream(name, p), group, id="0", mkstream=True)
        try:
            results = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise connection.failed(exc, f"creating consumer group {group!r}") from exc
        for result in results:
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise connection.failed(result, f"creating consumer group {group!r}")
            if isinstance(result, Exception) and not isinstance(result, ResponseError):
                raise connection.failed(result, f"creating consumer group {group!r}")

    async def _move_positions(
        self, connection: Connection, group: str, counts: dict[str, int], start: Start
    ) -> None:
        """Set the group's last delivered id on each partition for a replay."""
        moves: list[tuple[str, str]] = []
        for name, count in counts.items():
            for p in range(count):
                last: str | None
                if start.kind == "beginning":
                    last = "0-0"
                elif start.kind == "end":
                    last = "$"
                elif start.kind == "offsets":
                    offset = (start.offsets or {}).get(name, {}).get(p)
                    last = None if offset is None else id_before(offset)
                elif start.kind == "time":
                    # an entry's timestamp is its id's millisecond: the first at or after
                    # the time is the first in the millisecond rounded up
                    ms = math.ceil(round((start.time or 0.0) * 1_000_000) / 1000)
                    last = id_before(max(ms, 0) << SEQ_BITS)
                else:
                    last = None
                if last is not None:
                    moves.append((self.keys.stream(name, p), last))
        pipe = connection.client.pipeline(transaction=False)
        for stream, last in moves:
            await connection.replay(keys=[stream], args=[group, last], client=pipe)
        try:
            await pipe.execute()
        except RedisError as exc:
            raise connection.failed(
                exc, f"moving the positions of group {group!r} for a replay"
            ) from exc


def _publishing(publish: _Publish) -> str:
    return f"publishing {len(publish.streams)} messages"


def _caused(error: TransportError, cause: BaseException) -> TransportError:
    """``error`` as if raised ``from cause``."""
    error.__cause__ = cause
    return error
