"""The stream reader: an AMQP 0-9-1 connection nervus speaks itself, over which a
group member consumes the streams of the partitions it owns.

Through the client (aiormq, pamqp) each frame cost an ``await`` of its own, a hand-off
through a queue and a decoding into objects, and each delivered message a task:
about 60 % of the consumer's CPU. ``Reader`` is an ``asyncio.Protocol``:
``data_received`` cuts every complete frame out of what arrived (the tail of a
frame that is not complete waits, and is joined once with the rest), and the
method, content-header and body frames of a delivery (a body may span several
frames) become one synchronous call of the consumer's ``on_delivery`` with the
delivery tag, the routing key, the headers table (the one property nervus reads;
the others are skipped) and the body. No ``await`` and no task per frame or per
message.

It speaks what consuming needs, and no more:

* the handshake: ``Connection.Start``/``StartOk`` (PLAIN login with the URL's
  user and password), ``Tune``/``TuneOk`` (the broker's ``channel_max``,
  ``frame_max`` and heartbeat interval, which the reader then holds to) and
  ``Open``/``OpenOk`` on the URL's virtual host;
* heartbeats both ways: one goes out when nothing else was written for half the
  interval, and the connection is taken as lost once the broker sent nothing
  for twice the interval;
* per consumer, a channel: ``Channel.Open``, ``Basic.Qos`` (the prefetch),
  ``Basic.Consume`` with an arguments table (``x-stream-offset``),
  ``Basic.Ack`` (``multiple``), ``Basic.Cancel`` either way, ``Channel.Close``
  either way, and ``Channel.Flow``.

Errors name the broker (password hidden) and, when the broker said why, its
reply code and text: a connection that cannot be opened, drops, or that the
broker closes (a refused login or virtual host among them) gives
``TransportUnavailable``; a channel the broker closes or a consumer it cancels
gives ``TransportError``, raised by the call waiting on the channel or passed
to the consumer's ``on_closed``. When the connection is lost while open, the
reader calls ``on_lost`` once (never after ``close()``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import unquote, urlsplit

from nervus.errors import TransportError, TransportUnavailable
from nervus.transports.rabbitmq._amqp import (
    BODY,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    FRAME,
    FRAME_END,
    FRAME_END_BYTE,
    FRAME_HEADER,
    HEADER,
    HEADERS,
    HEARTBEAT,
    HEARTBEAT_FRAME,
    METHOD,
    PROTOCOL_HEADER,
    decode_long_string,
    decode_short_string,
    decode_table,
    field_table,
    long_string,
    method,
    short_string,
)

log = logging.getLogger("nervus.transports.rabbitmq")

OnDelivery = Callable[[int, str, dict[str, Any], bytes], None]
"""Called with a delivery's tag, routing key, headers and body as it arrives."""

OnClosed = Callable[[TransportError], None]
"""Called when the broker closes a consuming channel or cancels its consumer."""


def _ident(class_id: int, method_id: int) -> int:
    return class_id << 16 | method_id


# The methods the reader receives, as class << 16 | method.
_CONNECTION_START = _ident(10, 10)
_CONNECTION_SECURE = _ident(10, 20)
_CONNECTION_TUNE = _ident(10, 30)
_CONNECTION_OPEN_OK = _ident(10, 41)
_CONNECTION_CLOSE = _ident(10, 50)
_CONNECTION_CLOSE_OK = _ident(10, 51)
_CONNECTION_BLOCKED = _ident(10, 60)
_CONNECTION_UNBLOCKED = _ident(10, 61)
_CHANNEL_OPEN_OK = _ident(20, 11)
_CHANNEL_FLOW = _ident(20, 20)
_CHANNEL_CLOSE = _ident(20, 40)
_CHANNEL_CLOSE_OK = _ident(20, 41)
_BASIC_QOS_OK = _ident(60, 11)
_BASIC_CONSUME_OK = _ident(60, 21)
_BASIC_CANCEL = _ident(60, 30)
_BASIC_CANCEL_OK = _ident(60, 31)
_BASIC_DELIVER = _ident(60, 60)
_REPLIES = {
    _CHANNEL_OPEN_OK: "Channel.OpenOk",
    _BASIC_QOS_OK: "Basic.QosOk",
    _BASIC_CONSUME_OK: "Basic.ConsumeOk",
    _BASIC_CANCEL_OK: "Basic.CancelOk",
}

_IDENT = struct.Struct(">I")
_SHORT = struct.Struct(">H")
_CLOSE = struct.Struct(">H")  # reply code; the text, class and method follow
_TUNE = struct.Struct(">HIH")  # channel_max, frame_max, heartbeat
_QOS = struct.Struct(">IHB")  # prefetch size, prefetch count, global
_ACK = struct.Struct(">QB")  # delivery tag, multiple
_DELIVERY_TAG = struct.Struct(">Q")
_CONTENT = struct.Struct(">4xQH")  # (class, weight), body size, property flags

_FRAME_MAX_UNTUNED = 131072
"""The largest frame accepted before ``Tune`` (the broker's ``Start`` is far smaller)."""
_CHANNEL_MAX = 2047
"""The most channels the reader opens when the broker sets no limit of its own."""
_SILENT_TICKS = 4
"""Heartbeat ticks (half an interval each) the broker may stay silent."""
_PREFETCH_MAX = 65535

# States of the connection (_CONNECTING to _CLOSED) and of a channel (_NEW to _CLOSED).
_CONNECTING, _OPENING, _OPEN, _CLOSING, _CLOSED = range(5)
_NEW = _CONNECTING
_CLOSE_NORMALLY = b"\x00\xc8\x00\x00\x00\x00\x00"  # 200, no text, no class or method


def _version() -> str:
    try:
        return version("nervus")
    except PackageNotFoundError:
        return "unknown"


def _no_delivery(tag: int, routing_key: str, headers: dict[str, Any], body: bytes) -> None:
    """What a consumer does with a delivery before ``consume`` says (none can come)."""


def _no_close(error: TransportError) -> None:
    """What a consumer does when closed before ``consume`` says."""


class _ProtocolError(Exception):
    """The broker sent what AMQP 0-9-1 does not allow here; ``code`` is the reply code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


def _close_reason(data: bytes, pos: int) -> str:
    """``CODE TEXT`` of a ``Connection.Close`` or ``Channel.Close``."""
    (code,) = _CLOSE.unpack_from(data, pos)
    text, _ = decode_short_string(data, pos + 2)
    return f"{code} {text}"


class Consumer:
    """One channel of a ``Reader``, consuming one queue.

    Made by ``Reader.consumer`` (so that its owner can hold it before the first
    delivery arrives), then started by ``consume``. ``ack`` writes at once and does
    nothing once the channel is closing or closed.
    """

    __slots__ = (
        "_ack_head",
        "_done",
        "_expect",
        "_headers",
        "_parts",
        "_remaining",
        "_routing_key",
        "_state",
        "_tag",
        "_waiting",
        "consuming",
        "number",
        "on_closed",
        "on_delivery",
        "queue",
        "reader",
        "tag",
    )

    def __init__(self, reader: Reader, number: int) -> None:
        self.reader = reader
        self.number = number
        self.on_delivery: OnDelivery = _no_delivery
        self.on_closed: OnClosed = _no_close
        self.queue = ""
        self.tag = f"nervus-{number}"
        self.consuming = False
        self._state = _NEW
        self._waiting: tuple[int, asyncio.Future[None]] | None = None
        self._done: asyncio.Future[None] | None = None
        self._ack_head = FRAME.pack(METHOD, number, 13) + _IDENT.pack(_ident(60, 80))
        # the delivery being assembled
        self._expect = METHOD
        self._tag = 0
        self._routing_key = ""
        self._headers: dict[str, Any] = {}
        self._remaining = 0
        self._parts: list[bytes] = []

    @property
    def is_open(self) -> bool:
        return self._state == _OPEN

    def _describe(self) -> str:
        queue = f" consuming {self.queue!r}" if self.queue else ""
        return f"channel {self.number}{queue}"

    # -- calls ------------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        *,
        prefetch: int,
        on_delivery: OnDelivery,
        on_closed: OnClosed,
        arguments: Mapping[str, object] | None = None,
    ) -> None:
        """Open the channel, set its prefetch (at most 65535) and start consuming
        ``queue`` with manual acknowledgements: ``on_delivery`` is called with each
        message (from the first one, which may arrive before this returns), and
        ``on_closed`` if the broker later closes the channel or cancels the consumer."""
        self.queue = queue
        self.on_delivery = on_delivery
        self.on_closed = on_closed
        n = self.number
        self._state = _OPENING
        await self._call(method(n, 20, 10, b"\x00"), _CHANNEL_OPEN_OK)
        self._state = _OPEN
        count = max(1, min(prefetch, _PREFETCH_MAX))
        await self._call(method(n, 60, 10, _QOS.pack(0, count, 0)), _BASIC_QOS_OK)
        await self._call(
            method(
                n,
                60,
                20,
                b"\x00\x00"  # reserved
                + short_string(queue, "queue name")
                + short_string(self.tag, "consumer tag")
                + b"\x00"  # no_local, no_ack, exclusive, no_wait: all off
                + field_table(arguments or {}),
            ),
            _BASIC_CONSUME_OK,
        )

    async def cancel(self) -> None:
        """Stop the deliveries (``Basic.Cancel``); the channel stays open. Deliveries
        the broker sent before it confirmed are still handed out."""
        if self._state != _OPEN or not self.consuming:
            return
        frame = method(self.number, 60, 30, short_string(self.tag, "consumer tag") + b"\x00")
        await self._call(frame, _BASIC_CANCEL_OK)
        self.consuming = False

    def ack(self, tag: int, multiple: bool = False) -> None:
        """Acknowledge delivery ``tag`` (and every one before it, if ``multiple``)."""
        if self._state == _OPEN:
            self.reader.write(self._ack_head + _ACK.pack(tag, multiple) + FRAME_END)

    async def close(self) -> None:
        """Close the channel (the broker cancels its consumer); returns once the broker
        confirmed, or at once if the channel or its connection is already closed."""
        if self._state == _CLOSED:
            return
        if self._state == _NEW or not self.reader.is_open:
            self._finish(None)  # nothing to tell the broker
            return
        if self._state != _CLOSING:
            self._state = _CLOSING
            self.reader.write(method(self.number, 20, 40, _CLOSE_NORMALLY))
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
        await self._reply(asyncio.shield(self._done), "Channel.CloseOk")

    async def _call(self, frame: bytes, reply: int) -> None:
        if self._state in (_CLOSING, _CLOSED):
            raise TransportError(f"{self._describe()} on RabbitMQ at {self.reader.where} is closed")
        if self._waiting is not None:
            raise RuntimeError(f"{self._describe()} is already waiting for a reply")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting = (reply, future)
        try:
            self.reader.write(frame)
            await self._reply(future, _REPLIES[reply])
        finally:
            self._waiting = None

    async def _reply(self, answer: asyncio.Future[None], what: str) -> None:
        """Wait for the broker's ``answer``, at most the reader's ``timeout``: a broker
        that does not answer in order is given up with the whole connection."""
        reader = self.reader
        try:
            async with asyncio.timeout(reader.timeout):
                await answer
        except TimeoutError:
            error = TransportUnavailable(
                f"RabbitMQ at {reader.where} did not answer on {self._describe()} within "
                f"{reader.timeout}s (waiting for {what}); the stream reader's connection "
                "is given up"
            )
            reader.give_up(error)
            raise error from None

    # -- frames -----------------------------------------------------------------

    def _method(self, ident: int, data: bytes, pos: int) -> None:
        """A method other than ``Basic.Deliver``; ``pos`` is where its arguments start."""
        if ident == _CHANNEL_CLOSE:
            reason = _close_reason(data, pos)
            error = TransportError(
                f"RabbitMQ at {self.reader.where} closed {self._describe()}: {reason}"
            )
            self.reader.write(method(self.number, 20, 41))
            self._finish(error)
        elif ident == _CHANNEL_CLOSE_OK:
            self._finish(None)
        elif ident == _BASIC_CANCEL:
            self._cancelled()
        elif ident == _CHANNEL_FLOW:
            self.reader.write(method(self.number, 20, 21, bytes((data[pos] & 1,))))
        elif self._waiting is not None and ident == self._waiting[0]:
            if ident == _BASIC_CONSUME_OK:
                self.consuming = True  # deliveries may follow in this very read
            future = self._waiting[1]
            if not future.done():
                future.set_result(None)
        else:
            raise _ProtocolError(
                505, f"unexpected method {ident >> 16}.{ident & 0xFFFF} on {self._describe()}"
            )

    def _cancelled(self) -> None:
        """The broker cancelled the consumer (its queue was deleted, or its node left)."""
        was_consuming = self.consuming
        self.consuming = False
        if self._state != _OPEN:
            return
        self._state = _CLOSING  # nothing more to read here: close the channel too
        self.reader.write(method(self.number, 20, 40, _CLOSE_NORMALLY))
        if was_consuming:
            self.on_closed(
                TransportError(
                    f"RabbitMQ at {self.reader.where} cancelled the consumer of "
                    f"{self._describe()} (the queue was deleted, or its node went away)"
                )
            )

    def _finish(self, error: TransportError | None, notify: bool = True) -> None:
        """The channel is closed: by the broker (``error``), by ``close``, or with its
        connection (``notify`` false: the reader reports that itself)."""
        was_consuming = self.consuming and self._state == _OPEN
        self._state = _CLOSED
        self.consuming = False
        self._parts = []
        if notify:
            self.reader.forget(self)
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting[1].done():
            waiting[1].set_exception(
                error
                or TransportError(
                    f"{self._describe()} on RabbitMQ at {self.reader.where} was closed"
                )
            )
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if notify and error is not None and was_consuming:
            self.on_closed(error)

    def _deliver(self, data: bytes, pos: int) -> None:
        """``Basic.Deliver``, its arguments at ``pos``: consumer tag, delivery tag,
        redelivered, exchange, routing key."""
        if self._expect != METHOD:
            raise _ProtocolError(505, f"a delivery began inside another on {self._describe()}")
        pos += 1 + data[pos]  # consumer tag: one consumer per channel
        (self._tag,) = _DELIVERY_TAG.unpack_from(data, pos)
        pos += 9  # and the redelivered flag
        pos += 1 + data[pos]  # exchange
        end = pos + 1 + data[pos]
        self._routing_key = data[pos + 1 : end].decode("utf-8", "replace")
        self._expect = HEADER

    def _header(self, data: bytes, pos: int, end: int) -> None:
        """A content header, its payload from ``pos`` to ``end``."""
        if self._expect != HEADER:
            raise _ProtocolError(505, f"a content header came alone on {self._describe()}")
        size, flags = _CONTENT.unpack_from(data, pos)
        pos += 14
        if flags & CONTENT_TYPE:
            pos += 1 + data[pos]
        if flags & CONTENT_ENCODING:
            pos += 1 + data[pos]
        if flags & HEADERS:
            headers, pos = decode_table(data, pos)
            if pos > end:
                raise _ProtocolError(
                    501, f"a headers table ran past its frame on {self._describe()}"
                )
        else:
            headers = {}
        if size:
            self._headers = headers
            self._remaining = size
            self._expect = BODY
        else:
            self._expect = METHOD
            if self.consuming:
                self.on_delivery(self._tag, self._routing_key, headers, b"")

    def _body(self, chunk: bytes) -> None:
        if self._expect != BODY:
            raise _ProtocolError(505, f"a body frame came alone on {self._describe()}")
        remaining = self._remaining - len(chunk)
        if remaining > 0:
            self._parts.append(chunk)
            self._remaining = remaining
            return
        if remaining < 0:
            raise _ProtocolError(
                501, f"body frames longer than their content header said on {self._describe()}"
            )
        self._expect = METHOD
        if self._parts:
            self._parts.append(chunk)
            chunk = b"".join(self._parts)
            self._parts = []
        if self.consuming:
            self.on_delivery(self._tag, self._routing_key, self._headers, chunk)


class Reader(asyncio.Protocol):
    """One AMQP 0-9-1 connection for consumers (see the module); open it with ``connect``."""

    def __init__(
        self,
        where: str,
        username: str,
        password: str,
        vhost: str,
        name: str,
        timeout: float,
    ) -> None:
        self.where = where
        self.on_lost: Callable[[Reader, TransportError], None] | None = None
        self.error: TransportError | None = None
        self.heartbeat = 0
        self.frame_max = _FRAME_MAX_UNTUNED
        self.channel_max = _CHANNEL_MAX
        self._credentials = (username, password, vhost, name)
        self.timeout = timeout
        self._state = _CONNECTING
        self._closing = False  # close() was called: the loss is not reported
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._opened: asyncio.Future[None] = loop.create_future()
        self._finished: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._channels: dict[int, Consumer] = {}
        self._chunks: list[bytes] = []
        self._have = 0  # bytes in _chunks
        self._need = 0  # bytes the next frame needs
        self._heard = False  # anything read since the last heartbeat tick
        self._sent = False  # anything written since the last heartbeat tick
        self._silent = 0  # heartbeat ticks without anything read
        self._timer: asyncio.TimerHandle | None = None

    @property
    def is_open(self) -> bool:
        return self._state == _OPEN

    # -- consumers --------------------------------------------------------------

    def consumer(self) -> Consumer:
        """A consumer on a channel of its own, to be started with ``consume``."""
        if self._state != _OPEN:
            raise self.error or TransportUnavailable(
                f"the stream reader's connection to RabbitMQ at {self.where} is closed"
            )
        channels = self._channels
        number = next((n for n in range(1, self.channel_max + 1) if n not in channels), 0)
        if not number:
            raise TransportError(
                f"RabbitMQ at {self.where} allows {self.channel_max} channels per "
                "connection, and the stream reader uses them all"
            )
        consumer = Consumer(self, number)
        channels[number] = consumer
        return consumer

    def forget(self, consumer: Consumer) -> None:
        """Free the number of a closed channel."""
        if self._channels.get(consumer.number) is consumer:
            del self._channels[consumer.number]

    # -- writing ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and self._state != _CLOSED:
            transport.write(data)
            self._sent = True

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(PROTOCOL_HEADER)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if self.error is not None:
            return  # given up: the connection is closing
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            data = b"".join(self._chunks)
            self._chunks = []
        try:
            pos = self._frames(data)
        except _ProtocolError as exc:
            self._refuse(
                TransportUnavailable(
                    f"RabbitMQ at {self.where} broke the protocol on the stream reader's "
                    f"connection: {exc}"
                ),
                exc.code,
            )
            return
        except (ValueError, IndexError, struct.error) as exc:
            self._refuse(
                TransportUnavailable(
                    f"RabbitMQ at {self.where} sent a malformed frame on the stream reader's "
                    f"connection: {type(exc).__name__}: {exc}"
                ),
                501,
            )
            return
        rest = len(data) - pos
        if rest:
            self._chunks = [data[pos:] if pos else data]
            self._have = rest
            size = FRAME.unpack_from(data, pos)[2] if rest >= FRAME_HEADER else 0
            self._need = FRAME_HEADER + size + 1

    def _frames(self, data: bytes) -> int:
        """Handle every complete frame of ``data``; return where the first incomplete one starts."""
        channels = self._channels
        unpack = FRAME.unpack_from
        ident_of = _IDENT.unpack_from
        frame_max = self.frame_max
        total = len(data)
        pos = 0
        while total - pos > FRAME_HEADER:
            kind, number, size = unpack(data, pos)
            if size + FRAME_HEADER + 1 > frame_max:
                if data.startswith(b"AMQP", pos):
                    raise _ProtocolError(
                        505, "it does not speak AMQP 0-9-1 (it answered with its own version)"
                    )
                raise _ProtocolError(
                    501, f"a frame of {size} bytes is larger than frame_max {frame_max}"
                )
            end = pos + FRAME_HEADER + size
            if end >= total:
                break
            if data[end] != FRAME_END_BYTE:
                raise _ProtocolError(501, f"a frame of type {kind} does not end with 0xCE")
            start = pos + FRAME_HEADER
            pos = end + 1
            if kind == BODY:
                channel = channels.get(number)
                if channel is not None:
                    channel._body(data[start:end])
            elif kind == METHOD:
                (ident,) = ident_of(data, start)
                if number == 0:
                    self._connection_method(ident, data, start + 4)
                    frame_max = self.frame_max  # tuned
                    continue
                channel = channels.get(number)
                if channel is None:
                    continue  # a channel closed since: what was in flight is dropped
                if ident == _BASIC_DELIVER:
                    channel._deliver(data, start + 4)
                else:
                    channel._method(ident, data, start + 4)
            elif kind == HEADER:
                channel = channels.get(number)
                if channel is not None:
                    channel._header(data, start, end)
            elif kind != HEARTBEAT:
                raise _ProtocolError(505, f"unknown frame type {kind}")
        return pos

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        error = self.error
        if error is None:
            if not self._opened.done():
                why = f": {type(exc).__name__}: {exc}" if exc else ""
                error = TransportUnavailable(
                    f"RabbitMQ at {self.where} closed the connection during the handshake{why}"
                )
            else:
                why = f": {type(exc).__name__}: {exc}" if exc else ""
                error = TransportUnavailable(
                    f"the stream reader's connection to RabbitMQ at {self.where} dropped{why}"
                )
            self.error = error
        if not self._opened.done():
            self._opened.set_exception(error)
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            channel._finish(error, notify=False)
        if not self._finished.done():
            self._finished.set_result(None)
        if not self._closing and self.on_lost is not None:
            self.on_lost(self, error)

    # -- the connection's own methods ------------------------------------------

    def _connection_method(self, ident: int, data: bytes, pos: int) -> None:
        if ident == _CONNECTION_START:
            self._start(data, pos)
        elif ident == _CONNECTION_TUNE:
            self._tune(data, pos)
        elif ident == _CONNECTION_OPEN_OK:
            self._state = _OPEN
            if not self._opened.done():
                self._opened.set_result(None)
        elif ident == _CONNECTION_CLOSE:
            reason = _close_reason(data, pos)
            if self._state == _CONNECTING:
                text = f"RabbitMQ at {self.where} refused the connection: {reason}"
            else:
                text = f"RabbitMQ at {self.where} closed the stream reader's connection: {reason}"
            self._fail(TransportUnavailable(text), method(0, 10, 51))
        elif ident == _CONNECTION_CLOSE_OK:
            if self._transport is not None:
                self._transport.close()
        elif ident in (_CONNECTION_BLOCKED, _CONNECTION_UNBLOCKED):
            pass  # the reader publishes nothing
        elif ident == _CONNECTION_SECURE:
            raise _ProtocolError(540, "it asked for a login challenge; only PLAIN is supported")
        else:
            raise _ProtocolError(505, f"unexpected method {ident >> 16}.{ident & 0xFFFF}")

    def _start(self, data: bytes, pos: int) -> None:
        if data[pos] != 0 or data[pos + 1] != 9:
            raise _ProtocolError(505, f"it speaks AMQP {data[pos]}-{data[pos + 1]}, not 0-9")
        _, pos = decode_table(data, pos + 2)  # the server's properties
        mechanisms, pos = decode_long_string(data, pos)
        if b"PLAIN" not in mechanisms.split():
            raise _ProtocolError(
                540, f"it offers no PLAIN login (only {mechanisms.decode(errors='replace')})"
            )
        username, password, _, name = self._credentials
        properties = {
            "product": "nervus",
            "version": _version(),
            "platform": "Python",
            "connection_name": name,
            "capabilities": {
                "authentication_failure_close": True,
                "consumer_cancel_notify": True,
            },
        }
        response = b"\x00" + username.encode() + b"\x00" + password.encode()
        self.write(
            method(
                0,
                10,
                11,
                field_table(properties)
                + short_string("PLAIN", "mechanism")
                + long_string(response)
                + short_string("en_US", "locale"),
            )
        )

    def _tune(self, data: bytes, pos: int) -> None:
        channel_max, frame_max, heartbeat = _TUNE.unpack_from(data, pos)
        self.channel_max = min(channel_max or _CHANNEL_MAX, _CHANNEL_MAX)
        self.frame_max = frame_max or _FRAME_MAX_UNTUNED
        self.heartbeat = heartbeat
        self.write(method(0, 10, 31, _TUNE.pack(self.channel_max, self.frame_max, heartbeat)))
        vhost = self._credentials[2]
        self.write(method(0, 10, 40, short_string(vhost, "virtual host") + b"\x00\x00"))
        if heartbeat:
            self._timer = self._loop.call_later(heartbeat / 2, self._tick)

    def _tick(self) -> None:
        """Every half heartbeat interval: send one if nothing else went out, and give
        the connection up when the broker stayed silent for two intervals."""
        self._timer = None
        if self._state == _CLOSED:
            return
        if not self._sent:
            self.write(HEARTBEAT_FRAME)
        self._sent = False
        if self._heard:
            self._heard = False
            self._silent = 0
        else:
            self._silent += 1
            if self._silent >= _SILENT_TICKS:
                self._fail(
                    TransportUnavailable(
                        f"RabbitMQ at {self.where} sent nothing on the stream reader's "
                        f"connection for {2 * self.heartbeat} s (twice its heartbeat interval)"
                    )
                )
                return
        self._timer = self._loop.call_later(self.heartbeat / 2, self._tick)

    def give_up(self, error: TransportUnavailable) -> None:
        """Drop the connection at once because of ``error`` (reported as its loss)."""
        self._fail(error)

    def _fail(self, error: TransportUnavailable, farewell: bytes = b"") -> None:
        """Give the connection up with ``error``: write ``farewell`` (the method telling
        the broker) and close, or drop the connection at once when there is none."""
        if self.error is None:
            self.error = error
        transport = self._transport
        if transport is None or self._state == _CLOSED:
            return
        self._state = _CLOSING
        if farewell:
            self.write(farewell)
            transport.close()
        else:
            transport.abort()

    def _refuse(self, error: TransportUnavailable, code: int) -> None:
        """The broker broke the protocol: close with reply ``code`` and ``error`` as the text."""
        text = str(error).encode()[:255]
        self._fail(
            error, method(0, 10, 50, _SHORT.pack(code) + bytes((len(text),)) + text + bytes(4))
        )

    # -- opening and closing ----------------------------------------------------

    async def opened(self) -> None:
        """Wait for the handshake (``TransportUnavailable`` if it failed)."""
        await self._opened

    async def close(self) -> None:
        """Close the connection (the broker cancels its consumers); returns once the
        broker confirmed or the connection dropped, at most ``timeout`` later."""
        self._closing = True
        transport = self._transport
        if transport is None or self._finished.done():
            return
        for channel in self._channels.values():
            channel.consuming = False  # hand nothing more out
        if self._state == _OPEN:
            self._state = _CLOSING
            self.write(method(0, 10, 50, _CLOSE_NORMALLY))
        if self._state == _CLOSING:
            try:
                async with asyncio.timeout(self.timeout):
                    await asyncio.shield(self._finished)
                return
            except TimeoutError:
                pass
        transport.abort()
        await asyncio.shield(self._finished)

    def abort(self) -> None:
        """Drop the connection at once, without reporting it lost."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


async def connect(url: str, *, where: str, timeout: float, name: str) -> Reader:
    """A stream reader connected to the broker of ``url`` (``amqp://user:password@
    host:port/vhost``), within ``timeout`` seconds; ``where`` names the broker in errors."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    secure = parts.scheme == "amqps"
    port = parts.port or (5671 if secure else 5672)
    username = unquote(parts.username or "guest")
    password = unquote(parts.password or "guest")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    context = ssl.create_default_context() if secure else None
    loop = asyncio.get_running_loop()
    reader = Reader(where, username, password, vhost, name, timeout)
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(
                lambda: reader, host, port, ssl=context, server_hostname=host if secure else None
            )
            await reader.opened()
    except TimeoutError as exc:
        reader.abort()
        raise TransportUnavailable(
            f"cannot reach RabbitMQ at {where}: no answer within {timeout}s (connect_timeout)"
        ) from exc
    except TransportError:
        reader.abort()
        raise
    except OSError as exc:
        reader.abort()
        raise TransportUnavailable(
            f"cannot reach RabbitMQ at {where}: {type(exc).__name__}: {exc}"
        ) from exc
    except BaseException:
        reader.abort()
        raise
    return reader
