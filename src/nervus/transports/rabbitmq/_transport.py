"""The RabbitMQ transport: each channel partition is a stream queue (a durable,
replayable log); consumer groups keep their positions in the broker.

When the broker goes away
    The transport and each subscription notice that their connection dropped, log
    one warning naming the broker (password hidden) and the error, and reconnect
    with exponential backoff (0.2 s doubling up to 5 s between attempts); the end of
    the outage is logged too. Nothing needs to be reopened by the caller.

    - ``publish`` (and ``ensure_channel``, ``subscribe``) never waits for the broker
      to come back: while it is unreachable they raise ``TransportUnavailable``
      (retryable) naming the broker, after at most one reconnection attempt bounded
      by ``connect_timeout``; a publish whose confirms do not arrive within
      ``publish_timeout`` raises it too. As the contract says, a publish that failed
      may still have been accepted in part. The AMQP connection and the stream
      connection that publishing uses count as one: when either drops, both are
      opened again.
    - ``fetch`` raises ``TransportUnavailable`` (retryable: the runtime fetches again
      with backoff) while the subscription's connection is down, and returns
      deliveries again once it is back. Deliveries fetched before the connection
      dropped and not settled by then are revoked (settling them afterwards does
      nothing) and delivered again after the reconnection; what was settled before
      is not, because the member commits its settled positions first and reads
      again from them.

    The client's automatic reconnection (``connect_robust``) is not used: it would
    restore the exclusive lock queues and the stream consumers from their original
    offsets (giving a partition two owners and redelivering settled messages) and it
    reopens channels the broker closed after a failed declaration, which the
    declaration of channels relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection

from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
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
from nervus.transports.rabbitmq import _names
from nervus.transports.rabbitmq._outage import Outage, alive
from nervus.transports.rabbitmq._settings import RabbitSettings, redact
from nervus.transports.rabbitmq._streams import (
    StreamPublisher,
    describe,
    describe_error,
    encode,
)
from nervus.transports.rabbitmq._subscription import RabbitSubscription

log = logging.getLogger("nervus.transports.rabbitmq")

_CURRENT_VALUE = re.compile(r"current is (?:the value )?'(\d+)'")
_DELAY_REDECLARE = 60.0  # s between re-declarations of a delay queue (renews x-expires)
_DELAY_IDLE_MS = 600_000  # a delay queue unused that much longer than its TTL is deleted


class RabbitTransport(Transport):
    """Channels, consumer groups, delayed redelivery and replay on RabbitMQ.

    A channel is a stream queue per partition; ``publish`` sends each message over
    the stream protocol straight to the stream of the partition nervus computes from
    its key (the key travels in a header). A topic exchange routing ``P.KEY`` to
    partition ``P`` is declared too, for AMQP 0-9-1 publishers. Streams keep
    history, so a new group starts at the beginning and any group can replay.
    A group member owns a partition while its connection holds the partition's
    exclusive lock queue; members announce themselves on a fanout exchange and
    each locks its deterministic share among the members alive. The group's
    position in each partition is a one-message queue, rewritten as settled
    offsets advance. ``nack`` republishes to a delay queue per rounded delay whose
    TTL dead-letters the message into the partition's retry queue, which the
    partition's owner consumes alongside the stream.

    A replay (``start=`` other than committed) moves the group's positions when the
    subscription joins; members already running keep reading from where they are,
    so replay a group while it has no other members.
    """

    features = Features(
        cross_process_groups=True, replay=True, replay_from_time=True, delayed_redelivery=True
    )

    def __init__(self, settings: RabbitSettings) -> None:
        problems = settings.validate()
        if problems:
            raise ConfigurationError(problems)
        self.settings = settings
        self.where = redact(settings.amqp_url)
        self._connection: AbstractConnection | None = None
        self._streams: StreamPublisher | None = None
        self._admin: AbstractChannel | None = None
        self._admin_lock = asyncio.Lock()
        self._partition_counts: dict[str, int] = {}
        self._group_channels: set[tuple[str, str]] = set()
        self._delay_queues: dict[str, float] = {}
        self._round_robin: dict[str, int] = {}
        self._subscriptions: set[RabbitSubscription] = set()
        self._closed = False
        self._reconnect_lock = asyncio.Lock()
        self._outage = Outage("the RabbitMQ transport", self.where)

    @classmethod
    def from_url(cls, url: str, key: str = "NERVUS_TRANSPORT") -> RabbitTransport:
        """``amqp://user:password@host:5672/vhost`` with options (see ``RabbitSettings``),
        e.g. ``?partitions=8``; the options are removed from what the client sees."""
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigurationError([f"{key}={redact(url)!r}: expected an amqp:// URL"])
        if not parts.hostname:
            raise ConfigurationError(
                [f"{key}={redact(url)!r}: name the broker, e.g. amqp://guest:guest@127.0.0.1/"]
            )
        location = urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))
        return cls(parse_options(url, RabbitSettings, key=key, amqp_url=location))

    # -- lifecycle --------------------------------------------------------------

    async def open_connection(self) -> AbstractConnection:
        """A new connection to the broker, within ``connect_timeout``."""
        timeout = self.settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                return await aio_pika.connect(self.settings.amqp_url, timeout=timeout)
        except TimeoutError as exc:
            raise TransportUnavailable(
                f"cannot reach RabbitMQ at {self.where}: no answer within {timeout}s "
                "(connect_timeout)"
            ) from exc
        except Exception as exc:
            raise TransportUnavailable(
                f"cannot reach RabbitMQ at {self.where}: {type(exc).__name__}: {exc}"
            ) from exc

    async def connect(self) -> None:
        ensure_open(self._closed, f"RabbitMQ transport on {self.where}")
        if self._connection is not None:
            return
        await self._open()

    async def _open(self) -> AbstractConnection:
        connection = await self.open_connection()
        try:
            # a broker still starting may accept connections long before channels
            async with asyncio.timeout(self.settings.connect_timeout):
                admin = await connection.channel(publisher_confirms=True)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await connection.close()
            raise TransportUnavailable(
                f"cannot open a channel on RabbitMQ at {self.where} within "
                f"{self.settings.connect_timeout}s (connect_timeout): {type(exc).__name__}: {exc}"
            ) from exc
        try:
            streams = await self._open_streams()
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        # Declared again on first use: the broker may have lost what it had.
        self._partition_counts.clear()
        old, self._connection = self._connection, connection
        old_streams, self._streams = self._streams, streams
        self._admin = admin
        connection.close_callbacks.add(self._on_close)
        # the connections that dropped: release what they hold
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.connect_timeout):
                if old is not None:
                    await old.close()
                if old_streams is not None:
                    await old_streams.close(self.settings.connect_timeout)
        return connection

    async def _open_streams(self) -> StreamPublisher:
        """A stream-protocol publisher on ``stream_port`` of the broker's host, within
        ``connect_timeout``."""
        parts = urlsplit(self.settings.amqp_url)
        host = parts.hostname or "localhost"
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        streams = StreamPublisher(
            host,
            self.settings.stream_port,
            vhost,
            unquote(parts.username or "guest"),
            unquote(parts.password or "guest"),
        )
        timeout = self.settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await streams.start()
        except BaseException as exc:
            await streams.close(timeout)
            if not isinstance(exc, Exception):
                raise
            reason = (
                f"no answer within {timeout}s (connect_timeout)"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            raise TransportUnavailable(
                f"cannot reach the stream listener of RabbitMQ at {streams.where} "
                f"(stream_port={self.settings.stream_port}): {reason}"
            ) from exc
        return streams

    def _on_close(self, connection: object, error: BaseException | None) -> None:
        if not self._closed and connection is self._connection:
            self._outage.lost(error)

    async def _live(self) -> AbstractConnection:
        """The connection, reconnected first if it dropped; ``TransportUnavailable``
        while the broker cannot be reached (one attempt per backoff period, bounded by
        ``connect_timeout``; callers arriving during an attempt do not wait for it)."""
        connection = self._check()
        if alive(connection) and not self._outage.down and self._streams_alive():
            return connection
        if self._reconnect_lock.locked():
            raise TransportUnavailable(
                f"RabbitMQ at {self.where} is unreachable ({self._outage.error}); reconnecting now"
            )
        async with self._reconnect_lock:
            ensure_open(self._closed, f"RabbitMQ transport on {self.where}")
            connection = self._check()
            if alive(connection) and not self._outage.down and self._streams_alive():
                return connection
            if not self._outage.down:
                streams = self._streams
                self._outage.lost(
                    ConnectionError(streams.lost) if streams is not None and streams.lost else None
                )
            wait = self._outage.wait()
            if wait > 0:
                raise TransportUnavailable(
                    f"RabbitMQ at {self.where} is unreachable ({self._outage.error}); "
                    f"reconnecting, next attempt in {wait:.1f}s"
                )
            try:
                connection = await self._open()
            except TransportUnavailable as exc:
                self._outage.failed(exc)
                raise
            self._outage.restored()
            return connection

    def _streams_alive(self) -> bool:
        return self._streams is not None and self._streams.alive

    def _unavailable(self, exc: BaseException, doing: str, channel: str | None = None) -> None:
        """Raise ``TransportUnavailable`` for ``exc`` if it means the connection dropped."""
        connection = self._connection
        if (
            not alive(connection)
            or not self._streams_alive()
            or self._outage.down
            or isinstance(
                exc,
                aiormq.exceptions.AMQPConnectionError
                | aiormq.exceptions.ChannelInvalidStateError
                | ConnectionError
                | TimeoutError,
            )
        ):
            raise TransportUnavailable(
                f"{doing} on RabbitMQ at {self.where} failed: the connection was lost "
                f"({type(exc).__name__}: {exc}); retry once the broker is back",
                channel=channel,
            ) from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            with contextlib.suppress(Exception):
                await sub.close()
        connection, self._connection = self._connection, None
        streams, self._streams = self._streams, None
        if streams is not None:
            await streams.close(self.settings.connect_timeout)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    def _check(self) -> AbstractConnection:
        ensure_open(self._closed, f"RabbitMQ transport on {self.where}")
        if self._connection is None:
            raise TransportUnavailable(
                f"the RabbitMQ transport on {self.where} is not connected; "
                "await transport.connect() or use 'async with transport'"
            )
        return self._connection

    async def admin(self) -> AbstractChannel:
        """The channel for declarations and control messages (reopened after a
        declaration failed, which closes a channel)."""
        connection = await self._live()
        if self._admin is None or self._admin.is_closed:
            self._admin = await connection.channel(publisher_confirms=True)
        return self._admin

    # -- channels and publishing --------------------------------------------------

    async def ensure_channel(self, channel: str, partitions: int | None = None) -> int:
        await self._live()
        return await self._channel(channel, partitions)

    async def _channel(self, channel: str, partitions: int | None = None) -> int:
        """The channel's partition count, its exchange and streams declared on first use."""
        known = self._partition_counts.get(channel)
        if known is not None:
            return known
        if not channel:
            raise ConfigurationError(["a channel name must not be empty"])
        problems = _names.too_long(channel)
        if partitions is not None and not 1 <= partitions <= 1024:
            problems.append(f"channel {channel!r}: partitions={partitions} must be 1 to 1024")
        if problems:
            raise ConfigurationError(problems)
        async with self._admin_lock:
            known = self._partition_counts.get(channel)
            if known is not None:
                return known
            try:
                count = await self._declare_channel(channel, partitions or self.settings.partitions)
            except TransportError:
                raise
            except Exception as exc:
                self._unavailable(exc, "declaring the channel", channel)
                raise TransportError(
                    f"declaring the exchange and streams on RabbitMQ at {self.where} failed: "
                    f"{type(exc).__name__}: {exc}",
                    channel=channel,
                ) from exc
            self._partition_counts[channel] = count
            return count

    async def _declare_channel(self, channel: str, partitions: int) -> int:
        # Declarations that may fail run on a channel of their own: a failed
        # declaration closes the channel it ran on.
        probe = await self._check().channel()
        try:
            count = await self._partition_count(probe, channel, partitions)
            if probe.is_closed:
                probe = await self._check().channel()
            exchange = await probe.declare_exchange(
                _names.exchange(channel), aio_pika.ExchangeType.TOPIC, durable=True
            )
            arguments: dict[str, Any] = {"x-queue-type": "stream"}
            if self.settings.max_age is not None:
                arguments["x-max-age"] = self.settings.max_age
            if self.settings.max_bytes is not None:
                arguments["x-max-length-bytes"] = self.settings.max_bytes
            for p in range(count):
                name = _names.stream(channel, p)
                try:
                    queue = await probe.declare_queue(name, durable=True, arguments=arguments)
                except aiormq.exceptions.ChannelPreconditionFailed:
                    # it exists with other retention settings: keep them
                    probe = await self._check().channel()
                    queue = await probe.declare_queue(name, passive=True)
                    exchange = await probe.get_exchange(_names.exchange(channel), ensure=False)
                await queue.bind(exchange, f"{p}.#")
            return count
        finally:
            if not probe.is_closed:
                await probe.close()

    async def _partition_count(self, probe: AbstractChannel, channel: str, partitions: int) -> int:
        """The channel's partition count: recorded as ``x-max-length`` of an empty
        queue, which the broker keeps as declared first (the existing count wins)."""
        try:
            await probe.declare_queue(
                _names.partition_record(channel),
                durable=True,
                arguments={"x-max-length": partitions, "x-queue-type": "classic"},
            )
            return partitions
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            found = _CURRENT_VALUE.search(str(exc))
            if found is None:
                raise TransportError(
                    f"cannot read the partition count of the channel from "
                    f"{_names.partition_record(channel)!r}: {exc}",
                    channel=channel,
                ) from exc
            return int(found.group(1))

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        await self._live()
        if not messages:
            return
        count = await self._channel(channel)
        streams = self._streams
        assert streams is not None
        counter = self._round_robin.get(channel, 0)
        self._round_robin[channel] = counter + len(messages)
        now = int(time.time() * 1000)
        batches: dict[int, list[bytes]] = {}
        for i, m in enumerate(messages):
            headers: dict[str, str | int] = dict(m.headers)
            headers[_names.PUBLISHED_MS] = now
            if m.key is not None:
                headers[_names.KEY] = m.key
            partition = partition_for(m.key, count, counter + i)
            data = encode(headers, m.body, m.headers.get("ce_id"), m.headers.get("content-type"))
            batches.setdefault(partition, []).append(data)
        timeout = self.settings.publish_timeout
        stream = ""
        try:
            async with asyncio.timeout(timeout):
                answers = []
                for p, batch in batches.items():
                    stream = _names.stream(channel, p)
                    answers.append((stream, await streams.send(stream, batch)))
                refused = [(stream, await answer) for stream, answer in answers]
        except TimeoutError as exc:
            raise TransportUnavailable(
                f"RabbitMQ at {streams.where} did not confirm {len(messages)} messages within "
                f"{timeout}s (publish_timeout); some may have been accepted",
                channel=channel,
            ) from exc
        except Exception as exc:
            if self._closed:
                ensure_open(True, f"RabbitMQ transport on {self.where}")
            self._partition_counts.pop(channel, None)  # declared again by the next call
            self._unavailable(exc, f"publishing to stream {stream!r}", channel)
            raise TransportError(
                f"publishing {len(messages)} messages to stream {stream!r} on RabbitMQ at "
                f"{streams.where} failed: {describe_error(exc)}",
                channel=channel,
            ) from exc
        for stream, codes in refused:
            if not codes:
                continue
            if self._closed:
                ensure_open(True, f"RabbitMQ transport on {self.where}")
            self._partition_counts.pop(channel, None)  # declared again by the next call
            if not streams.alive:
                raise TransportUnavailable(
                    f"publishing {len(messages)} messages to stream {stream!r} on RabbitMQ at "
                    f"{streams.where} failed: {streams.lost}; retry once the broker is back",
                    channel=channel,
                )
            raise TransportError(
                f"RabbitMQ at {streams.where} refused {len(codes)} of the {len(messages)} "
                f"messages published to stream {stream!r}: code {describe(codes[0])}",
                channel=channel,
            )

    # -- groups -----------------------------------------------------------------

    async def ensure_group(self, channel: str, group: str, partitions: int) -> None:
        """Declare the queues and exchange of ``group`` on ``channel`` (once per transport)."""
        if (channel, group) in self._group_channels:
            return
        problems = _names.too_long(channel, group)
        if problems:
            raise ConfigurationError(problems)
        async with self._admin_lock:
            admin = await self.admin()
            retry = await admin.declare_exchange(
                _names.retry_exchange(channel, group), aio_pika.ExchangeType.HEADERS, durable=True
            )
            for p in range(partitions):
                queue = await admin.declare_queue(
                    _names.retry_queue(channel, group, p), durable=True
                )
                await queue.bind(retry, "", arguments={"x-match": "all", _names.PARTITION: str(p)})
                await admin.declare_queue(
                    _names.offset_queue(channel, group, p),
                    durable=True,
                    arguments={"x-max-length": 1},
                )
        self._group_channels.add((channel, group))

    async def delay_queue(self, channel: str, group: str, delay: float) -> str:
        """The delay queue for ``delay`` (rounded up), declared when not used lately."""
        ms = _names.delay_bucket(delay)
        name = _names.delay_queue(channel, group, ms)
        if time.monotonic() - self._delay_queues.get(name, -_DELAY_REDECLARE) < _DELAY_REDECLARE:
            return name
        async with self._admin_lock:
            admin = await self.admin()
            await admin.declare_queue(
                name,
                durable=True,
                arguments={
                    "x-message-ttl": ms,
                    "x-expires": ms + _DELAY_IDLE_MS,
                    "x-dead-letter-exchange": _names.retry_exchange(channel, group),
                },
            )
        self._delay_queues[name] = time.monotonic()
        return name

    async def send(self, exchange: str, routing_key: str, message: aio_pika.Message) -> None:
        """Publish one control message and wait for the broker's confirm."""
        admin = await self.admin()
        if exchange:
            target = await admin.get_exchange(exchange, ensure=False)
        else:
            target = admin.default_exchange
        await target.publish(message, routing_key)

    async def write_position(self, channel: str, group: str, partition: int, value: object) -> None:
        """Record ``group``'s position in a partition: ``{"offset": n}`` (next to read),
        ``{"time": t}`` or ``{"end": true}``."""
        message = aio_pika.Message(
            json.dumps(value).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self.send("", _names.offset_queue(channel, group, partition), message)

    async def move_positions(self, group: str, channels: dict[str, int], start: Start) -> None:
        """Set the group's positions for a replay (they may move backwards)."""
        writes = []
        for name, count in channels.items():
            for p in range(count):
                value: object = None
                if start.kind == "beginning":
                    value = {"offset": 0}
                elif start.kind == "end":
                    value = {"end": True}
                elif start.kind == "time":
                    value = {"time": start.time or 0.0}
                elif start.kind == "offsets":
                    offset = (start.offsets or {}).get(name, {}).get(p)
                    value = None if offset is None else {"offset": offset}
                if value is not None:
                    writes.append(self.write_position(name, group, p, value))
        await asyncio.gather(*writes)

    # -- consuming --------------------------------------------------------------

    async def subscribe(
        self,
        channels: Iterable[str],
        group: str,
        *,
        max_in_flight: int = 1000,
        start: Start | None = None,
    ) -> Subscription:
        await self._live()
        names = list(dict.fromkeys(channels))
        if not names:
            raise ConfigurationError([f"group {group!r}: subscribe to at least one channel"])
        if not group:
            raise ConfigurationError(["a consumer group name must not be empty"])
        found: dict[str, int] = {}
        for name in names:
            found[name] = await self._channel(name)
            await self.ensure_group(name, group, found[name])
        if start is not None and start.kind != "committed":
            await self.move_positions(group, found, start)
        sub = RabbitSubscription(self, group, found, max(1, max_in_flight))
        self._subscriptions.add(sub)
        try:
            await sub.start()
        except BaseException:
            self._subscriptions.discard(sub)
            with contextlib.suppress(Exception):
                await sub.close()
            raise
        return sub

    def forget_subscription(self, sub: RabbitSubscription) -> None:
        self._subscriptions.discard(sub)
