"""A member of a consumer group on RabbitMQ streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage

from nervus.errors import TransportError, TransportUnavailable
from nervus.transports._contract import (
    DeadLetterReason,
    Delivery,
    OffsetTracker,
    Subscription,
    dead_letter_channel,
    dead_letter_message,
    ensure_open,
)
from nervus.transports.rabbitmq import _names
from nervus.transports.rabbitmq._membership import Members, targets
from nervus.transports.rabbitmq._outage import Outage, alive
from nervus.transports.rabbitmq._publisher import Publisher, confirmed, publisher_on
from nervus.transports.rabbitmq._reader import Consumer, OnClosed, OnDelivery, Reader, connect

if TYPE_CHECKING:
    from nervus.transports.rabbitmq._transport import RabbitTransport

log = logging.getLogger("nervus.transports.rabbitmq")

Pair = tuple[str, int]
_PREFETCH_MAX = 65535  # Basic.Qos carries the prefetch count in 16 bits
_Control = tuple[str, str, dict[str, Any], bytes, str | None]
"""A control message: exchange, routing key, headers, body, message id."""


class _Owned:
    """A partition this member holds the lock of, with what reads it.

    ``stream`` consumes the partition's stream on the member's stream reader;
    ``retries`` is the client's channel consuming the retry queue (closed to stop
    it) and ``retries_amqp`` the protocol channel under it, which acknowledges
    without wrapping each message in an object of the client. Stream
    acknowledgements only return credit (the group keeps its own positions), so
    the stream is acknowledged ``multiple`` up to the newest message handed out
    once ``credit_every`` of them are waiting: the prefetch window never closes,
    and a fetch costs no acknowledgement of its own.
    """

    __slots__ = (
        "after_ms",
        "channel",
        "credit_every",
        "last_tag",
        "partition",
        "retries",
        "retries_amqp",
        "start",
        "stream",
        "unacknowledged",
    )

    def __init__(
        self,
        channel: str,
        partition: int,
        stream: Consumer,
        retries: AbstractChannel,
        retries_amqp: aiormq.abc.AbstractChannel,
        start: int,
        after_ms: float | None,
        prefetch: int,
    ) -> None:
        self.channel = channel
        self.partition = partition
        self.stream = stream
        self.retries = retries
        self.retries_amqp = retries_amqp
        self.start = start  # stream offsets below it are skipped
        self.after_ms = after_ms  # until one passes, skip messages published before it
        self.credit_every = max(1, prefetch // 2)
        self.unacknowledged = 0  # stream messages handed out or skipped, not yet acknowledged
        self.last_tag = 0  # the newest of them

    def return_credit(self) -> None:
        """Acknowledge the stream up to the newest message handed out or skipped
        (nothing happens once the stream's channel is closed: the partition was revoked)."""
        self.unacknowledged = 0
        self.stream.ack(self.last_tag, multiple=True)


class _Handle:
    __slots__ = ("owned", "retry", "tag")

    def __init__(self, owned: _Owned, tag: int, retry: bool) -> None:
        self.owned = owned
        self.tag = tag
        self.retry = retry


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _number(value: object, default: int) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    return default


class RabbitSubscription(Subscription):
    """Holds the locks of its share of the partitions and reads their streams from
    the group's committed positions (and their retry queues); commits settled
    positions at most every ``commit_interval`` seconds.

    Each subscription has two connections of its own: one through the client, for
    the lock queues, the retry queues, control messages and membership (the broker
    drops the locks, and requeues the retries held, the moment it drops), and its
    stream reader (``_reader.py``), which consumes the streams of its partitions.
    A partition is only read while both are up, so when either drops while the
    subscription is open the member treats it as an outage of both: it gives up its
    partitions (what it fetched and had not settled is delivered again), commits the
    positions it had settled if the client's connection still works, closes what is
    left, reconnects both with backoff, commits what is still uncommitted and takes
    its share of the partitions again; in the meantime ``fetch`` raises
    ``TransportUnavailable`` (retryable). A partition whose stream the broker stops
    (its channel closed, its consumer cancelled) is given up and taken again.
    """

    def __init__(
        self,
        transport: RabbitTransport,
        group: str,
        channels: Mapping[str, int],
        max_in_flight: int,
    ) -> None:
        self.group = group
        self.channels = tuple(channels)
        self._transport = transport
        self._settings = transport.settings
        self._counts = dict(channels)
        self._prefetch = min(max_in_flight, _PREFETCH_MAX)
        self._member = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._members = Members(
            group, self._member, frozenset(channels), self._settings.session_seconds
        )
        self._connection: AbstractConnection | None = None
        self._reader: Reader | None = None
        self._hang_ups: set[asyncio.Task[None]] = set()
        self._broken: list[_Owned] = []  # stopped by the broker, to give up
        self._control: AbstractChannel | None = None
        self._publisher: Publisher | None = None  # on the control channel
        self._owned: dict[Pair, _Owned] = {}
        self._buffer: deque[Delivery] = deque()
        self._ready = asyncio.Event()
        self._tracker = OffsetTracker()
        self._positions: dict[Pair, int] = {}
        self._commit_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._outage = Outage(f"member {self._member} of group {self.group!r}", transport.where)

    @property
    def member(self) -> str:
        """This member's id in the group (host, process and a random part)."""
        return self._member

    async def start(self) -> None:
        await self._connect()
        await self._rebalance()
        self._tasks = [
            asyncio.create_task(self._membership_loop()),
            asyncio.create_task(self._commit_loop()),
        ]

    # -- fetching ---------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        ensure_open(self._closed, f"subscription of group {self.group!r}")
        if max_messages <= 0:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            out = self._take(max_messages)
            if out or self._closed:
                return out
            if self._outage.down:
                raise TransportUnavailable(
                    f"group {self.group!r} lost its connection to RabbitMQ at "
                    f"{self._transport.where} ({self._outage.error}); reconnecting in the "
                    "background, fetch again later"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._ready.wait()

    def _take(self, limit: int) -> list[Delivery]:
        buffer, owned, fetched = self._buffer, self._owned, self._tracker.fetched
        out: list[Delivery] = []
        credit: list[_Owned] = []
        while buffer and len(out) < limit:
            d = buffer.popleft()
            handle: _Handle = d.handle  # type: ignore[assignment]
            source = handle.owned
            if owned.get((d.channel, d.partition)) is not source:
                continue  # revoked: the partition's next owner reads it again
            out.append(d)
            if not handle.retry:
                fetched(d.channel, d.partition, d.offset)
                source.last_tag = handle.tag
                source.unacknowledged += 1
                if source.unacknowledged == source.credit_every:
                    credit.append(source)
        for source in credit:
            source.return_credit()
        return out

    def _on_stream(self, owned: _Owned) -> OnDelivery:
        key = channel, partition = owned.channel, owned.partition
        buffer, ready, drop = self._buffer, self._ready, _names.BROKER_HEADERS
        prefix = f"{partition}."

        def deliver(tag: int, routing_key: str, raw: dict[str, Any], body: bytes) -> None:
            if self._owned.get(key) is not owned:
                return
            offset = raw.get("x-stream-offset", -1)
            if type(offset) is not int:
                offset = _number(offset, -1)
            published = raw.get(_names.PUBLISHED_MS)
            if offset < owned.start or (
                owned.after_ms is not None
                and isinstance(published, int)
                and published < owned.after_ms
            ):
                owned.last_tag = tag
                owned.unacknowledged += 1
                if owned.unacknowledged >= owned.credit_every:
                    owned.return_credit()
                return
            owned.after_ms = None
            key_header = raw.get(_names.KEY)
            if key_header is not None:
                message_key: str | None = (
                    key_header if type(key_header) is str else _text(key_header)
                )
            else:  # published through the exchange: routing key ``P.KEY``
                message_key = routing_key[len(prefix) :] if routing_key.startswith(prefix) else None
            buffer.append(
                Delivery(
                    channel=channel,
                    partition=partition,
                    offset=offset,
                    key=message_key,
                    headers={
                        k: v if type(v) is str else _text(v)
                        for k, v in raw.items()
                        if k not in drop
                    },
                    body=body,
                    timestamp=published / 1000 if isinstance(published, int) else 0.0,
                    handle=_Handle(owned, tag, False),
                )
            )
            ready.set()

        return deliver

    def _on_stream_closed(self, owned: _Owned) -> OnClosed:
        key = (owned.channel, owned.partition)

        def closed(error: TransportError) -> None:
            if self._owned.get(key) is not owned:
                return
            log.warning(
                "member %s of group %r stopped reading %s[%d]: %s; it gives the partition "
                "up and takes it again",
                self._member,
                self.group,
                owned.channel,
                owned.partition,
                error,
            )
            del self._owned[key]
            self._tracker.forget(*key)
            self._broken.append(owned)
            self._members.changed.set()  # the membership loop gives it up

        return closed

    def _on_retry(self, owned: _Owned) -> Any:
        key = (owned.channel, owned.partition)

        async def deliver(message: DeliveredMessage) -> None:
            if self._owned.get(key) is not owned:
                return
            raw = message.header.properties.headers or {}
            offset = _number(raw.get(_names.OFFSET), -1)
            attempt = _number(raw.get(_names.ATTEMPT), 2)
            self._buffer.append(self._retried(owned, message, raw, offset, attempt))
            self._ready.set()

        return deliver

    @staticmethod
    def _retried(
        owned: _Owned,
        message: DeliveredMessage,
        raw: dict[str, Any],
        offset: int,
        attempt: int,
    ) -> Delivery:
        drop = _names.BROKER_HEADERS
        headers = {k: v if type(v) is str else _text(v) for k, v in raw.items() if k not in drop}
        published = raw.get(_names.PUBLISHED_MS)
        key_header = raw.get(_names.KEY)
        key = None if key_header is None else _text(key_header)
        return Delivery(
            channel=owned.channel,
            partition=owned.partition,
            offset=offset,
            key=key,
            headers=headers,
            body=message.body,
            attempt=attempt,
            timestamp=published / 1000 if isinstance(published, int) else 0.0,
            handle=_Handle(owned, message.delivery_tag or 0, True),
        )

    # -- settling ---------------------------------------------------------------

    def _settle(self, d: Delivery) -> _Handle | None:
        """Settle ``d``; return the handle of the retry-queue message to acknowledge, if any."""
        handle = d.handle
        if not isinstance(handle, _Handle):
            raise ValueError(
                f"delivery {d.channel}[{d.partition}]@{d.offset} was not fetched from this "
                "RabbitMQ subscription; settle a delivery on the subscription that fetched it"
            )
        key = (d.channel, d.partition)
        if self._owned.get(key) is not handle.owned:
            return None  # revoked: delivered again to the partition's next owner
        if handle.retry:
            return handle
        position = self._tracker.settle(d.channel, d.partition, d.offset)
        if position is not None:
            self._positions[key] = position
        return None

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        ensure_open(self._closed, f"subscription of group {self.group!r}")
        retries = [h for h in map(self._settle, deliveries) if h is not None]
        for handle in retries:
            await self._ack_retry(handle)

    @staticmethod
    async def _ack_retry(handle: _Handle) -> None:
        # A closed channel means the partition was revoked: the broker requeued it.
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError):
            await handle.owned.retries_amqp.basic_ack(handle.tag)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        ensure_open(self._closed, f"subscription of group {self.group!r}")
        handle = delivery.handle
        if isinstance(handle, _Handle) and (
            self._owned.get((delivery.channel, delivery.partition)) is not handle.owned
        ):
            return  # revoked: the partition's next owner delivers it again
        headers: dict[str, Any] = dict(delivery.headers)
        headers[_names.ATTEMPT] = delivery.attempt + 1
        headers[_names.OFFSET] = delivery.offset
        headers[_names.PARTITION] = str(delivery.partition)
        headers[_names.PUBLISHED_MS] = int(delivery.timestamp * 1000)
        if delivery.key is not None:
            headers[_names.KEY] = delivery.key
        if delay <= 0:
            exchange, queue = _names.retry_exchange(delivery.channel, self.group), ""
        else:
            exchange = ""
            queue = await self._transport.delay_queue(delivery.channel, self.group, delay)
        await self._send(
            [(exchange, queue, headers, delivery.body, delivery.headers.get("ce_id"))],
            f"for redelivery on {queue or exchange!r}",
        )
        retry = self._settle(delivery)
        if retry is not None:
            await self._ack_retry(retry)

    async def dead_letter(self, delivery: Delivery, reason: DeadLetterReason) -> None:
        ensure_open(self._closed, f"subscription of group {self.group!r}")
        handle = delivery.handle
        if isinstance(handle, _Handle) and (
            self._owned.get((delivery.channel, delivery.partition)) is not handle.owned
        ):
            return  # revoked: the partition's next owner delivers it again
        await self._transport.publish(
            dead_letter_channel(delivery.channel, self.group),
            [dead_letter_message(delivery, self.group, reason)],
        )
        retry = self._settle(delivery)
        if retry is not None:
            await self._ack_retry(retry)

    async def _send(self, messages: list[_Control], what: str) -> None:
        """Publish persistent ``(exchange, routing key, headers, body, message id)``
        messages on the control channel, in one write, and wait for their confirms."""
        try:
            publisher = await self._control_publisher()
            encode = publisher.encode
            frames = [
                encode(Publisher.target(exchange), key, headers, body, message_id)
                for exchange, key, headers, body, message_id in messages
            ]
            failed = await confirmed(publisher.send(frames))
            if failed:
                raise failed[0]
        except Exception as exc:
            if self._outage.down or not alive(self._connection):
                raise TransportUnavailable(
                    f"RabbitMQ at {self._transport.where} is unreachable for group "
                    f"{self.group!r} ({type(exc).__name__}: {exc}); reconnecting"
                ) from exc
            raise TransportError(
                f"RabbitMQ at {self._transport.where} did not accept {len(messages)} "
                f"message(s) of group {self.group!r} {what}: {type(exc).__name__}: {exc}"
            ) from exc

    async def _control_channel(self) -> AbstractChannel:
        if self._control is None or self._control.is_closed:
            assert self._connection is not None
            self._control = await self._connection.channel(publisher_confirms=True)
            self._publisher = None
        return self._control

    async def _control_publisher(self) -> Publisher:
        control = await self._control_channel()
        if self._publisher is None:
            self._publisher = await publisher_on(control)
        return self._publisher

    def assignment(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._owned)

    # -- committing -------------------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = max(self._settings.commit_interval, 0.01)
        while not self._closed:
            await asyncio.sleep(interval)
            if self._outage.down:
                continue  # committed once reconnected
            try:
                await self._commit()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("committing positions of group %r failed", self.group, exc_info=True)

    async def _commit(self, only: Pair | None = None) -> None:
        async with self._commit_lock:
            if only is None:
                positions, self._positions = self._positions, {}
            else:
                position = self._positions.pop(only, None)
                positions = {} if position is None else {only: position}
            if not positions:
                return
            try:
                await self._send(
                    [
                        (
                            "",
                            _names.offset_queue(channel, self.group, partition),
                            {},
                            json.dumps({"offset": position}).encode(),
                            None,
                        )
                        for (channel, partition), position in positions.items()
                    ],
                    "recording its positions",
                )
            except BaseException:
                for pair, pos in positions.items():
                    if self._positions.get(pair, -1) < pos:
                        self._positions[pair] = pos
                raise

    # -- connection -------------------------------------------------------------

    async def _connect(self) -> None:
        """Open the client's connection, its control channel, join the group's
        announcements, then open the stream reader."""
        connection = await self._transport.open_connection()
        timeout = self._settings.connect_timeout
        try:
            self._connection = connection
            async with asyncio.timeout(timeout):
                self._control = await connection.channel(publisher_confirms=True)
                self._publisher = None
                await self._members.start(await connection.channel())
            reader = await connect(
                self._settings.amqp_url,
                where=self._transport.where,
                timeout=timeout,
                name=f"nervus streams of {self._member} in group {self.group}",
            )
        except BaseException:
            self._connection = None
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._reader = reader
        reader.on_lost = self._on_reader_lost
        connection.close_callbacks.add(self._on_close)

    def _alive(self) -> bool:
        """Whether both connections are open."""
        return alive(self._connection) and self._reader is not None and self._reader.is_open

    def _on_close(self, connection: object, error: BaseException | None) -> None:
        if not self._closed and connection is self._connection:
            self._lost(error)

    def _on_reader_lost(self, reader: Reader, error: BaseException) -> None:
        if not self._closed and reader is self._reader:
            self._lost(error)

    def _lost(self, error: BaseException | None) -> None:
        """A connection dropped: give up every partition (the broker released the
        locks, or does once the other connection is closed), close the other, and let
        the membership loop reconnect both."""
        if self._outage.down:
            return
        self._outage.lost(error)
        self._revoke_all()
        self._hang_up()
        self._members.changed.set()  # wakes the membership loop, which reconnects
        self._ready.set()  # wakes fetch, which reports the outage

    def _revoke_all(self) -> None:
        for pair in list(self._owned):
            self._tracker.forget(*pair)
        self._owned.clear()
        self._broken.clear()
        self._buffer.clear()

    def _hang_up(self) -> None:
        """Close both connections in the background (``_hung_up`` waits for it)."""
        task = asyncio.get_running_loop().create_task(
            self._close_both(self._connection, self._reader)
        )
        self._hang_ups.add(task)
        task.add_done_callback(self._hang_ups.discard)

    async def _close_both(
        self, connection: AbstractConnection | None, reader: Reader | None
    ) -> None:
        """Close the stream reader and the client's connection; while the latter still
        works, commit the settled positions first, so that the partitions' next
        owners do not read them again."""
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.close()
        if connection is None or not alive(connection):
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._settings.connect_timeout):
                if self._positions:
                    await self._commit()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._settings.connect_timeout):
                await connection.close()

    async def _hung_up(self) -> None:
        """Wait until the connections being closed in the background are closed."""
        while self._hang_ups:
            await asyncio.wait(set(self._hang_ups))

    async def _reconnect(self) -> bool:
        """One reconnection attempt: once the connections that were left are closed,
        connect both, commit what was settled before the outage (so it is not read
        again), then rebalance as usual."""
        await self._hung_up()
        try:
            await self._connect()
            self._revoke_all()  # anything acquired while the connection was dying
            async with asyncio.timeout(self._settings.connect_timeout):
                await self._commit()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._outage.failed(exc)
            connection, self._connection = self._connection, None
            reader, self._reader = self._reader, None
            await self._close_both(None, reader)
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
            return False
        self._outage.restored()
        return True

    # -- membership -------------------------------------------------------------

    async def _membership_loop(self) -> None:
        heartbeat = self._settings.heartbeat_seconds
        tick = min(heartbeat / 2, 0.25)
        next_announcement = time.monotonic() + heartbeat
        changed = self._members.changed
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await changed.wait()
            changed.clear()
            if self._closed:
                break
            if not self._outage.down and not self._alive():
                self._lost(None)
            if self._outage.down:
                if self._outage.wait() > 0 or not await self._reconnect():
                    continue
                next_announcement = time.monotonic() + heartbeat
            try:
                if time.monotonic() >= next_announcement:
                    next_announcement = time.monotonic() + heartbeat
                    await self._members.announce()
                await self._rebalance()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._alive():
                    self._lost(exc)  # one warning for the outage, not one per attempt
                    continue
                log.warning(
                    "rebalancing %s in group %r failed; retrying",
                    self._member,
                    self.group,
                    exc_info=True,
                )

    async def _rebalance(self) -> None:
        while self._broken:
            await self._give_up(self._broken.pop())
        wanted = targets(self._member, self._members.live(), self._counts)
        for pair in [p for p in self._owned if p not in wanted]:
            await self._release(pair)
        for pair in sorted(wanted - set(self._owned)):
            if self._closed:
                return
            await self._acquire(pair)

    async def _acquire(self, pair: Pair) -> bool:
        """Take the partition's lock if it is free and start reading it."""
        assert self._connection is not None and self._reader is not None
        channel, partition = pair
        retry_channel = await self._connection.channel()
        try:
            await retry_channel.declare_queue(
                _names.lock_queue(channel, self.group, partition), exclusive=True
            )
        except aiormq.exceptions.ChannelLockedResource:
            return False  # another member holds it (the failure closed the channel)
        stream: Consumer | None = None
        owned: _Owned | None = None
        try:
            offsets = await retry_channel.get_queue(
                _names.offset_queue(channel, self.group, partition), ensure=False
            )
            record = await offsets.get(no_ack=False, fail=False)
            position: dict[str, Any] = {}
            if record is not None:
                position = json.loads(record.body)
                await record.reject(requeue=True)
            start, after_ms, argument = 0, None, "first"
            if "offset" in position:
                start = int(position["offset"])
                argument = start  # type: ignore[assignment]
            elif "time" in position:
                after_ms = float(position["time"]) * 1000
                argument = datetime.fromtimestamp(float(position["time"]), UTC)  # type: ignore[assignment]
            elif position.get("end"):
                argument = "next"
            await retry_channel.set_qos(prefetch_count=self._prefetch)
            retries_amqp = await retry_channel.get_underlay_channel()
            stream = self._reader.consumer()
            owned = _Owned(
                channel,
                partition,
                stream,
                retry_channel,
                retries_amqp,
                start,
                after_ms,
                self._prefetch,
            )
            self._tracker.forget(channel, partition)
            self._owned[pair] = owned
            await stream.consume(
                _names.stream(channel, partition),
                prefetch=self._prefetch,
                arguments={"x-stream-offset": argument},
                on_delivery=self._on_stream(owned),
                on_closed=self._on_stream_closed(owned),
            )
            await retries_amqp.basic_consume(
                _names.retry_queue(channel, self.group, partition), self._on_retry(owned)
            )
        except BaseException:
            if owned is not None and self._owned.get(pair) is owned:
                del self._owned[pair]
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.close()
            if not retry_channel.is_closed:
                with contextlib.suppress(Exception):
                    await retry_channel.close()
            with contextlib.suppress(Exception):
                await self._unlock(pair)
            raise
        self._ready.set()
        return True

    async def _release(self, pair: Pair) -> None:
        """Stop reading a partition, commit its settled position, then unlock it."""
        owned = self._owned.pop(pair, None)
        if owned is None:
            return
        self._tracker.forget(*pair)
        await self._give_up(owned)

    async def _give_up(self, owned: _Owned) -> None:
        """Stop reading a partition no longer owned, commit its settled position, unlock it."""
        pair = (owned.channel, owned.partition)
        await self._stop(owned)
        await self._commit(pair)
        await self._unlock(pair)

    @staticmethod
    async def _stop(owned: _Owned) -> None:
        # Closing the channels cancels the consumers and requeues unsettled retries.
        with contextlib.suppress(Exception):
            await owned.stream.close()
        if not owned.retries.is_closed:
            with contextlib.suppress(Exception):
                await owned.retries.close()

    async def _unlock(self, pair: Pair) -> None:
        control = await self._control_channel()
        await control.queue_delete(_names.lock_queue(pair[0], self.group, pair[1]))

    # -- closing ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._transport.forget_subscription(self)
        owned, self._owned = list(self._owned.values()), {}
        self._broken.clear()
        self._buffer.clear()
        await self._hung_up()
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.close()  # stops every stream at once
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if not alive(connection):
            if self._positions:
                log.warning(
                    "group %r closed while RabbitMQ at %s was unreachable: settled positions "
                    "were not committed; their messages will be delivered again",
                    self.group,
                    self._transport.where,
                )
            return
        try:
            for o in owned:
                await self._stop(o)
            async with asyncio.timeout(self._settings.connect_timeout):
                if self._positions:
                    self._connection = connection
                    await self._commit()
                await self._members.announce(leaving=True)
        except Exception:
            log.warning(
                "committing positions of group %r while closing failed", self.group, exc_info=True
            )
        finally:
            self._connection = None
            # The broker deletes this connection's lock queues when it closes.
            with contextlib.suppress(Exception):
                await connection.close()
