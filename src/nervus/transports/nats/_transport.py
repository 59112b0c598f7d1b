"""The NATS JetStream transport: a stream per channel, a subject per partition, a
durable pull consumer per group and partition, group leases in a key-value bucket.

When the server goes away
    The client reconnects by itself, once a second, for as long as the transport is
    open; nothing needs reopening. The transport logs one warning per outage, naming
    the URL and the error, and one info line when it is back. Meanwhile:

    - ``publish`` (and every other request: channel and consumer creation, nack,
      dead-letter) waits for the connection to come back for at most
      ``request_timeout`` seconds in all, then raises ``TransportUnavailable``
      (retryable) naming the URL, how long the connection has been down and the
      last error. A publish cut by the outage may still have been stored: publish
      it again; JetStream drops the repeat by ``ce_id`` within ``duplicate_window``.
    - ``fetch`` sends no pull requests; it returns what it already holds, else waits
      its timeout for the reconnect and then raises ``TransportUnavailable``
      (retryable: the runtime fetches again with backoff).
    - ``ack`` does not wait: acknowledgements are buffered by the client (up to its
      outbound buffer) and sent on reconnect; when the buffer is full it raises
      ``TransportUnavailable``.
    - A subscription stops renewing its lease; once ``lease_seconds`` pass without
      renewal it hands out nothing more until a renewal after the reconnect says
      which partitions it still owns.

    The streams, consumers and their acknowledgement state are the server's
    (``storage=file`` keeps them across a restart), so what was acknowledged stays
    acknowledged and what was delivered but not acknowledged is delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

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
from nervus.transports.nats._headers import to_nats
from nervus.transports.nats._names import (
    check_channel,
    check_group,
    consumer_name,
    partition_subject,
    stream_name,
)
from nervus.transports.nats._settings import NatsSettings
from nervus.transports.nats._subscription import NatsSubscription

log = logging.getLogger("nervus.transports.nats")

_PUBLISHES_IN_FLIGHT = 4000  # the transport's bound on unacknowledged publishes


class _Client(Client):
    """The NATS client, reading header blocks with fewer Python steps per line.

    nats-py (2.16) checks each header name for white space one character at a
    time in a generator: for the ten headers of a CloudEvent that was about a third
    of what a consumer spent per message. Same result: lines ``Name: value``, names
    that are not ASCII or hold white space skipped, values trimmed and decoded as
    UTF-8 with replacement."""

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if len(key.split()) > 1:  # white space inside the name (its ends are trimmed)
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: where it was stored, or why not."""

    seq: int = 0
    error: dict[str, Any] | None = None


_read_ack = msgspec.json.Decoder(_PubAck).decode


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    location, slash, path = rest.partition("/")
    userinfo, at, hosts = location.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hosts}{slash}{path}"


class NatsTransport(Transport):
    """Channels as JetStream streams, partitions as subjects, groups as durable pull
    consumers (one per partition) owned by one member at a time through leases.

    Each channel is a stream ``<namespace>_<channel>`` whose subjects are
    ``<namespace>.<channel>.<partition>``; a message's partition comes from its key
    (``partition_for``), which travels in the ``ce_partitionkey`` header. The other
    headers are the message's own (CloudEvents binary mode: ``ce_id``, ``ce_type`` ...),
    plus ``Nats-Msg-Id`` set to ``ce_id`` so JetStream drops duplicate publishes;
    values NATS would change (line breaks, white space at the ends) travel
    percent-encoded and are decoded on delivery (see ``_headers``).
    A delivery's ``offset`` is the stream sequence (increasing per partition, not
    dense) and its ``attempt`` the server's delivery count.

    A replay (``start=`` other than committed) recreates the group's consumers of the
    channels when the subscription joins; members of the group already running lose
    their consumers, so replay a group while it has no other members.
    """

    features = Features(
        cross_process_groups=True, replay=True, replay_from_time=True, delayed_redelivery=True
    )

    def __init__(self, settings: NatsSettings, url: str | None = None) -> None:
        problems = settings.validate()
        if problems:
            raise ConfigurationError(problems)
        self.settings = settings
        # the servers without password or options, for messages
        self.url = redact((url or ",".join(settings.servers)).partition("?")[0])
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._bucket: KeyValue | None = None
        self._channels: dict[str, int] = {}
        self._subjects: dict[str, list[str]] = {}
        self._consumers: set[tuple[str, str]] = set()
        self._round_robin: dict[str, int] = {}
        self._subscriptions: set[NatsSubscription] = set()
        self._connected = False
        self._closed = False
        self._last_error: BaseException | None = None
        self._up = asyncio.Event()  # set while the client is connected
        self._ack_prefix = ""
        self._acks: dict[str, asyncio.Future[None]] = {}  # by token, unacknowledged publishes
        self._tokens = itertools.count()
        self._ack_room = asyncio.Event()  # set while fewer than _PUBLISHES_IN_FLIGHT
        self._down_since: float | None = None

    @classmethod
    def from_url(cls, url: str, key: str = "NERVUS_TRANSPORT") -> NatsTransport:
        """``nats://[user:password@]host:4222[,host2:4222]`` with options (see
        ``NatsSettings``), e.g. ``?partitions=8&namespace=shop``."""
        parts = urlsplit(url)
        if parts.scheme != "nats":
            raise ConfigurationError([f"{key}={redact(url)!r}: expected a nats:// URL"])
        location = parts.netloc
        userinfo, at, hosts = location.rpartition("@")
        servers = [
            f"nats://{userinfo}{at}{host if ':' in host else host + ':4222'}"
            for host in hosts.split(",")
            if host
        ]
        if not servers:
            raise ConfigurationError(
                [f"{key}={redact(url)!r}: name a server, e.g. nats://127.0.0.1:4222"]
            )
        if parts.path not in ("", "/"):
            raise ConfigurationError(
                [f"{key}={redact(url)!r}: a NATS URL has no path; put options after '?'"]
            )
        return cls(parse_options(url, NatsSettings, key=key, servers=servers), url)

    # -- lifecycle --------------------------------------------------------------

    async def connect(self) -> None:
        ensure_open(self._closed, f"NATS transport on {self.url}")
        if self._connected:
            return
        nc = _Client()
        settings = self.settings
        self._last_error = None
        try:
            async with asyncio.timeout(settings.connect_timeout):
                await nc.connect(
                    servers=settings.servers,
                    connect_timeout=max(1, min(math.ceil(settings.connect_timeout), 2)),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    name=f"nervus-{socket.gethostname()}-{os.getpid()}",
                )
                js = nc.jetstream(timeout=settings.request_timeout)
                await js.account_info()
                # publish acknowledgements come to one inbox, ``<prefix>.<token>``
                ack_prefix = nc.new_inbox()
                await nc.subscribe(f"{ack_prefix}.*", cb=self._on_ack)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            cause = self._last_error if isinstance(exc, TimeoutError) else exc
            no_jetstream = (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)
            if isinstance(exc, no_jetstream):
                what = "JetStream is not enabled on the server (start nats-server with -js)"
            else:
                what = (
                    _describe(cause)
                    if cause
                    else "no NATS server answered there (the client port is usually 4222)"
                )
            raise TransportUnavailable(
                f"cannot reach NATS JetStream at {self.url} within "
                f"{settings.connect_timeout}s: {what}"
            ) from exc
        self._nc, self._js = nc, js
        self._ack_prefix = f"{ack_prefix}."
        self._down_since = None
        self._up.set()
        try:
            self._bucket = await self._groups_bucket()
        except TransportError:
            self._nc = self._js = None
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._connected = True

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        if self._connected and self._down_since is None and not isinstance(exc, _CONNECTION_LOST):
            log.warning("NATS connection to %s: %s", self.url, _describe(exc))
        else:  # connecting, or the outage was already reported
            log.debug("NATS connection to %s: %s", self.url, _describe(exc))

    async def _on_disconnected(self) -> None:
        if not self._connected or self._closed or self._down_since is not None:
            return
        self._up.clear()
        self._down_since = time.monotonic()
        log.warning(
            "lost the connection to NATS at %s (%s); reconnecting every second: publishes "
            "wait up to %ss for it, fetches fail until it is back",
            self.url,
            _describe(self._last_error) if self._last_error else "closed by the server",
            self.settings.request_timeout,
        )

    async def _on_reconnected(self) -> None:
        if self._closed:
            return
        down = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        log.info(
            "reconnected to NATS at %s after %.1fs (last error: %s)",
            self.url,
            down,
            _describe(self._last_error) if self._last_error else "none",
        )
        self._down_since = None
        self._last_error = None
        self._up.set()
        for sub in self._subscriptions:
            sub.wake()

    @property
    def connection_up(self) -> bool:
        """Whether the client is connected now (False during an outage, while it
        reconnects)."""
        return self._nc is not None and self._nc.is_connected

    def unavailable(self, what: str, channel: str | None = None) -> TransportUnavailable:
        """The error of ``what`` failing because the connection is down."""
        return TransportUnavailable(
            f"{what} on {self.url} failed: not connected{self._outage()}", channel=channel
        )

    def _outage(self) -> str:
        """Why requests fail now: how long the connection has been down and the last
        error, or the empty string while connected."""
        if self._down_since is None:
            return ""
        error = _describe(self._last_error) if self._last_error else "closed by the server"
        return (
            f"; the connection has been down for {time.monotonic() - self._down_since:.1f}s "
            f"(last error: {error}) and the client keeps reconnecting: retry later"
        )

    async def _groups_bucket(self) -> KeyValue:
        js = self._jetstream()
        name = self.settings.groups_bucket
        async with self._requests(f"opening the key-value bucket {name!r}"):
            try:
                return await js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                pass
            try:
                return await js.create_key_value(
                    bucket=name,
                    description="nervus consumer group memberships",
                    history=1,
                    storage=api.StorageType(self.settings.storage),
                    replicas=self.settings.replicas,
                )
            except nats.js.errors.BadRequestError:  # created meanwhile by another process
                return await js.key_value(name)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            with contextlib.suppress(TransportError, nats.errors.Error):
                await sub.close()
        self._connected = False
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.settings.request_timeout):
                    await nc.flush()
            with contextlib.suppress(Exception):
                await nc.close()

    def _check(self) -> None:
        ensure_open(self._closed, f"NATS transport on {self.url}")
        if not self._connected:
            raise TransportUnavailable(
                f"the NATS transport on {self.url} is not connected; "
                "await transport.connect() or use 'async with transport'"
            )

    @property
    def client(self) -> Client:
        """The NATS connection (connected)."""
        self._check()
        assert self._nc is not None
        return self._nc

    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise TransportUnavailable(f"the NATS transport on {self.url} is not connected")
        return self._js

    @property
    def bucket(self) -> KeyValue:
        self._check()
        assert self._bucket is not None
        return self._bucket

    @contextlib.asynccontextmanager
    async def _requests(
        self, what: str, channel: str | None = None, rounds: int = 1, *, wait: bool = True
    ) -> Any:
        """Turn the client's errors into nervus errors naming ``what`` failed; give up
        after ``rounds`` request timeouts. With ``wait``, first wait (within that
        time) for the connection when the client is reconnecting."""
        seconds = self.settings.request_timeout * rounds
        try:
            async with asyncio.timeout(seconds):
                if wait and not (self._nc is not None and self._nc.is_connected):
                    self._up.clear()  # set again on reconnect
                    await self._up.wait()
                yield
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise TransportUnavailable(
                f"{what} on {self.url} timed out after {seconds}s{self._outage()}", channel=channel
            ) from exc
        except _UNAVAILABLE as exc:
            raise TransportUnavailable(
                f"{what} on {self.url} failed: {_describe(exc)}{self._outage()}", channel=channel
            ) from exc
        except nats.errors.Error as exc:
            raise TransportError(
                f"{what} on {self.url} failed: {type(exc).__name__}: {exc}", channel=channel
            ) from exc

    # -- channels and publishing --------------------------------------------------

    async def ensure_channel(self, channel: str, partitions: int | None = None) -> int:
        self._check()
        return await self._channel(channel, partitions)

    async def _channel(self, channel: str, partitions: int | None = None) -> int:
        known = self._channels.get(channel)
        if known is not None:
            return known
        check_channel(channel)
        if partitions is not None and not 1 <= partitions <= 1024:
            raise ConfigurationError(
                [f"channel {channel!r}: partitions={partitions} must be between 1 and 1024"]
            )
        namespace = self.settings.namespace
        name = stream_name(namespace, channel)
        js = self._jetstream()
        async with self._requests(f"creating the stream {name!r}", channel):
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                count = partitions or self.settings.partitions
                config = api.StreamConfig(
                    name=name,
                    description=f"nervus channel {channel}",
                    subjects=[partition_subject(namespace, channel, p) for p in range(count)],
                    retention=api.RetentionPolicy.LIMITS,
                    storage=api.StorageType(self.settings.storage),
                    num_replicas=self.settings.replicas,
                    duplicate_window=self.settings.duplicate_window,
                    max_age=self.settings.retention_seconds,
                    max_bytes=self.settings.retention_bytes,
                    discard=api.DiscardPolicy.OLD,
                )
                try:
                    info = await js.add_stream(config)
                except nats.js.errors.BadRequestError:  # created meanwhile, maybe differently
                    info = await js.stream_info(name)
        subjects = list(info.config.subjects or [])
        expected = [partition_subject(namespace, channel, p) for p in range(len(subjects))]
        if not subjects or subjects != expected:
            raise TransportError(
                f"stream {name!r} exists with subjects {subjects[:4]} ...; nervus expects "
                f"{namespace}.{channel}.<partition> for partitions 0, 1, ...: it was not created "
                "by nervus, or with another namespace",
                channel=channel,
            )
        self._subjects[channel] = subjects
        self._channels[channel] = len(subjects)
        return len(subjects)

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        self._check()
        if not messages:
            return
        count = await self._channel(channel)
        subjects = self._subjects[channel]
        counter = self._round_robin.get(channel, 0)
        self._round_robin[channel] = counter + len(messages)
        nc = self.client
        acks, tokens, prefix = self._acks, self._tokens, self._ack_prefix
        loop = asyncio.get_running_loop()
        rounds = 1 + len(messages) // _PUBLISHES_IN_FLIGHT
        async with self._requests(f"publishing {len(messages)} messages", channel, rounds):
            # Every publish goes out without waiting (at most _PUBLISHES_IN_FLIGHT
            # unacknowledged), then the acknowledgements are gathered.
            mine: list[str] = []
            futures: list[asyncio.Future[None]] = []
            try:
                for i, m in enumerate(messages):
                    while len(acks) >= _PUBLISHES_IN_FLIGHT:
                        self._ack_room.clear()
                        await self._ack_room.wait()
                    token = str(next(tokens))
                    acks[token] = future = loop.create_future()
                    mine.append(token)
                    futures.append(future)
                    await nc.publish(
                        subjects[partition_for(m.key, count, counter + i)],
                        m.body,
                        reply=prefix + token,
                        headers=to_nats(m.key, m.headers),
                    )
                await asyncio.gather(*futures)
            finally:
                for token in mine:
                    unanswered = acks.pop(token, None)
                    if unanswered is not None:
                        unanswered.cancel()
                self._ack_room.set()

    async def _on_ack(self, msg: Msg) -> None:
        """Settle the publish a JetStream acknowledgement answers."""
        future = self._acks.pop(msg.subject[len(self._ack_prefix) :], None)
        if len(self._acks) < _PUBLISHES_IN_FLIGHT:
            self._ack_room.set()
        if future is None or future.done():
            return  # given up on (timed out or cancelled)
        if not msg.data:  # a status: no stream listens on the subject (503)
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = _read_ack(msg.data)
        except msgspec.DecodeError:
            future.set_exception(
                nats.errors.Error(f"unreadable publish acknowledgement {msg.data[:200]!r}")
            )
            return
        if ack.error is None:
            future.set_result(None)
            return
        try:
            nats.js.errors.APIError.from_error(ack.error)  # raises the error's own class
        except nats.errors.Error as exc:
            future.set_exception(exc)
        except Exception:  # not shaped as JetStream's errors are
            future.set_exception(nats.errors.Error(f"publish refused: {ack.error}"))

    # -- consumers ----------------------------------------------------------------

    async def ensure_consumer(
        self, channel: str, group: str, partition: int, max_ack_pending: int
    ) -> tuple[str, str]:
        """Create the durable consumer of ``group`` on a partition unless it exists;
        return (stream, consumer) names."""
        stream = stream_name(self.settings.namespace, channel)
        name = consumer_name(group, partition)
        if (stream, name) in self._consumers:
            return stream, name
        js = self._jetstream()
        async with self._requests(f"creating the consumer {name!r} of {stream!r}", channel):
            try:
                await js.consumer_info(stream, name)
            except nats.js.errors.NotFoundError:
                config = self._consumer_config(channel, group, partition, max_ack_pending)
                try:
                    await js.add_consumer(stream, config)
                except nats.js.errors.BadRequestError:  # created meanwhile by another member
                    await js.consumer_info(stream, name)
        self._consumers.add((stream, name))
        return stream, name

    def forget_consumer(self, stream: str, name: str) -> None:
        """The consumer was deleted (by a replay elsewhere): check it exists next time."""
        self._consumers.discard((stream, name))

    def _consumer_config(
        self,
        channel: str,
        group: str,
        partition: int,
        max_ack_pending: int,
        **start: Any,
    ) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=consumer_name(group, partition),
            description=f"nervus group {group} on {channel} partition {partition}",
            filter_subject=partition_subject(self.settings.namespace, channel, partition),
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait,
            max_ack_pending=max_ack_pending,
            max_deliver=-1,
            replay_policy=api.ReplayPolicy.INSTANT,
            deliver_policy=start.pop("deliver_policy", api.DeliverPolicy.ALL),
            **start,
        )

    async def _move_positions(
        self, group: str, channels: Mapping[str, int], start: Start, max_ack_pending: int
    ) -> None:
        """Recreate the group's consumers where ``start`` moves their position."""
        js = self._jetstream()
        for channel, count in channels.items():
            stream = stream_name(self.settings.namespace, channel)
            for part in range(count):
                policy: dict[str, Any]
                if start.kind == "beginning":
                    policy = {"deliver_policy": api.DeliverPolicy.ALL}
                elif start.kind == "end":
                    policy = {"deliver_policy": api.DeliverPolicy.NEW}
                elif start.kind == "time":
                    policy = {
                        "deliver_policy": api.DeliverPolicy.BY_START_TIME,
                        "opt_start_time": datetime.fromtimestamp(start.time or 0.0, UTC),
                    }
                elif start.kind == "offsets":
                    offset = (start.offsets or {}).get(channel, {}).get(part)
                    if offset is None:
                        continue
                    policy = {
                        "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
                        "opt_start_seq": max(offset, 1),
                    }
                else:
                    continue
                name = consumer_name(group, part)
                config = self._consumer_config(channel, group, part, max_ack_pending, **policy)
                async with self._requests(f"replaying {name!r} of {stream!r}", channel):
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await js.delete_consumer(stream, name)
                    await js.add_consumer(stream, config)
                self._consumers.add((stream, name))

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
        check_group(group)
        if max_in_flight < 1:
            raise ConfigurationError([f"group {group!r}: max_in_flight must be at least 1"])
        counts = {name: await self._channel(name) for name in names}
        if start is not None and start.kind != "committed":
            await self._move_positions(group, counts, start, max_in_flight)
        member = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        sub = NatsSubscription(self, group, counts, member, max_in_flight)
        self._subscriptions.add(sub)
        try:
            await sub.start()
        except BaseException:
            self._subscriptions.discard(sub)
            raise
        return sub

    def forget_subscription(self, sub: NatsSubscription) -> None:
        self._subscriptions.discard(sub)

    @property
    def closed(self) -> bool:
        return self._closed

    def requests(self, what: str, channel: str | None = None, *, wait: bool = True) -> Any:
        """A context turning client errors into nervus errors (for subscriptions)."""
        return self._requests(what, channel, wait=wait)


_CONNECTION_LOST = (nats.errors.StaleConnectionError, ConnectionError)
"""Errors the client reports when it loses the connection (the outage warning names them)."""

_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
"""Client errors a later retry can get past: no connection, or JetStream not ready."""


def _describe(exc: BaseException) -> str:
    """``Type: message`` of a client error (many have an empty or generic message)."""
    text = str(exc)
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name
