"""Publishing to stream queues over RabbitMQ's stream protocol (port 5552 by default).

The broker ingests a batch of stream-protocol messages at a fraction of what it
spends routing AMQP 0-9-1 publishes into a stream, so the transport sends its
channel messages this way, straight to the partition's stream. ``StreamPublisher``
wraps one rstream ``Producer``: each ``send`` is one ``Publish`` frame carrying all
of a call's messages for one stream (several frames when they exceed its 1 MiB;
a single message that does not fit in one frame is refused with ``ValueError``);
concurrent calls write their frames on the same connection. A call's messages
are confirmed (or refused) by the broker's ``PublishConfirm`` and ``PublishError``
frames; ``send`` returns a future that resolves, once every message was answered,
to the refusals' codes (empty: all accepted).

Each message is an AMQP 1.0 message (what the stream protocol carries, and what
the broker turns into AMQP 0-9-1 for AMQP consumers): the properties
``message-id`` and ``content-type``, the headers as application properties
(strings as ``str32-utf8``, integers as ``long``, which AMQP 0-9-1 consumers get
as ``S`` and ``l`` header values) and the body as one ``data`` section. There is
no ``header`` section (durability: a stream keeps every message anyway): RabbitMQ
3.10 cannot convert a message that has one for AMQP 0-9-1 consumers and closes
their connection instead.

rstream's own recovery is off: when the connection drops, the pending calls fail
with ``CONNECTION_LOST`` and the publisher stays ``lost``; the transport opens a
new one with its next connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Mapping
from typing import Any

from rstream import ConfirmationStatus, Producer, ServerError
from rstream.recovery import BackOffRecoveryStrategy
from rstream.utils import OnClosedErrorInfo

CONNECTION_LOST = -1
"""The code of a message whose stream connection dropped before the broker answered."""

_PROPERTIES = b"\x00\x53\x73"
_APPLICATION_PROPERTIES = b"\x00\x53\x74"
_DATA = b"\x00\x53\x75"
_NULL = b"\x40"
_LONG = struct.Struct(">Bq")  # 0x81 and a signed 64-bit value
_SIZE_COUNT = struct.Struct(">II")
_STR32 = struct.Struct(">BI")


def _string(text: str) -> bytes:
    data = text.encode()
    return _STR32.pack(0xB1, len(data)) + data


def encode(
    headers: Mapping[str, str | int],
    body: bytes,
    message_id: str | None = None,
    content_type: str | None = None,
) -> bytes:
    """One AMQP 1.0 message (see the module); ``content_type`` is left out unless ASCII,
    as AMQP 1.0 makes it a symbol."""
    parts: list[bytes] = []
    if content_type is not None and not content_type.isascii():
        content_type = None
    if message_id is not None or content_type is not None:
        fields = [_NULL if message_id is None else _string(message_id)]
        if content_type is not None:
            data = content_type.encode()
            fields += [_NULL] * 5
            fields.append(_STR32.pack(0xB3, len(data)) + data)
        items = b"".join(fields)
        parts += (_PROPERTIES, b"\xd0", _SIZE_COUNT.pack(len(items) + 4, len(fields)), items)
    if headers:
        entries: list[bytes] = []
        for name, value in headers.items():
            entries.append(_string(name))
            if type(value) is int:
                entries.append(_LONG.pack(0x81, value))
            else:
                entries.append(_string(str(value)))
        items = b"".join(entries)
        parts += (
            _APPLICATION_PROPERTIES,
            b"\xd1",
            _SIZE_COUNT.pack(len(items) + 4, len(entries)),
            items,
        )
    parts += (_DATA, _STR32.pack(0xB0, len(body)), body)
    return b"".join(parts)


FRAME_MAX = 1024 * 1024
"""The largest frame nervus asks for (RabbitMQ's default ``stream.frame_max``)."""

_FRAME_OVERHEAD = 13  # size, key, version, publisher id, message count
_MESSAGE_OVERHEAD = 12  # publishing id, size


def _frames(messages: list[bytes]) -> list[list[bytes]]:
    """``messages`` cut into batches that each fit in one ``Publish`` frame;
    ``ValueError`` for a message that fits in none."""
    batches: list[list[bytes]] = []
    batch: list[bytes] = []
    size = _FRAME_OVERHEAD
    for message in messages:
        length = len(message) + _MESSAGE_OVERHEAD
        if length + _FRAME_OVERHEAD > FRAME_MAX:
            raise ValueError(
                f"a message of {len(message)} bytes does not fit in the stream protocol's "
                f"largest frame ({FRAME_MAX} bytes)"
            )
        if size + length > FRAME_MAX:
            batches.append(batch)
            batch, size = [], _FRAME_OVERHEAD
        batch.append(message)
        size += length
    if batch:
        batches.append(batch)
    return batches


class _Call:
    """The broker's answers to one ``send``: resolves ``done`` with the refusal codes."""

    __slots__ = ("done", "refused", "waiting")

    def __init__(self, count: int, done: asyncio.Future[list[int]]) -> None:
        self.waiting = count
        self.refused: list[int] = []
        self.done = done

    def __call__(self, status: ConfirmationStatus) -> None:
        if not status.is_confirmed:
            self.refused.append(status.response_code)
        self.waiting -= 1
        if self.waiting <= 0 and not self.done.done():
            self.done.set_result(self.refused)

    def fail(self) -> None:
        """The connection dropped: whatever was not answered is lost."""
        if not self.done.done():
            self.done.set_result([*self.refused, *([CONNECTION_LOST] * max(self.waiting, 1))])


class StreamPublisher:
    """One rstream producer on the broker's stream port (see the module)."""

    def __init__(self, host: str, port: int, vhost: str, username: str, password: str) -> None:
        self.where = f"{host}:{port}"
        self.lost: str | None = None
        self._calls: set[_Call] = set()
        self._producer = Producer(
            host,
            port,
            vhost=vhost,
            username=username,
            password=password,
            frame_max=FRAME_MAX,
            connection_name="nervus-publisher",
            on_close_handler=self._on_close,
            recovery_strategy=BackOffRecoveryStrategy(enable=False),
        )

    async def start(self) -> None:
        await self._producer.start()

    @property
    def alive(self) -> bool:
        return self.lost is None

    def _on_close(self, info: OnClosedErrorInfo) -> None:
        if info.reason == "Metadata Update":
            # a stream was deleted (or moved): rstream fails that stream's pending
            # messages itself; the connection is still up
            return
        if self.lost is None:
            self.lost = f"the stream connection to {self.where} closed ({info.reason})"
        for call in list(self._calls):
            call.fail()
        self._calls.clear()

    async def send(self, stream: str, messages: list[bytes]) -> asyncio.Future[list[int]]:
        """Publish ``messages`` to ``stream``; the future resolves to the refusal codes
        once the broker answered for every message."""
        done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        call = _Call(len(messages), done)
        if self.lost is not None:
            call.fail()
            return done
        self._calls.add(call)
        done.add_done_callback(lambda _: self._calls.discard(call))
        try:
            for batch in _frames(messages):
                sent = await self._producer.send_batch(stream, batch, on_publish_confirm=call)
                if not sent or self.lost is not None:  # closed, or the frame went nowhere
                    call.fail()
                    break
        except BaseException:
            self._calls.discard(call)
            raise
        return done

    async def close(self, timeout: float = 10.0) -> None:
        """Close the producer's connections (within ``timeout`` seconds)."""
        self.lost = self.lost or "closed"
        for call in list(self._calls):
            call.fail()
        sockets = _sockets(self._producer)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await self._producer.close()
        # rstream closes only the connections still alive: close those that broke too
        for writer in sockets:
            if not writer.is_closing():
                writer.close()


def _sockets(producer: Producer) -> list[asyncio.StreamWriter]:
    """The writers of every connection ``producer`` opened (rstream keeps them in its
    connection pool, the producer's per-stream clients and its locator client)."""
    pool: Any = getattr(producer, "_pool", None)
    clients: list[Any] = [c for group in getattr(pool, "_clients", {}).values() for c in group]
    clients += getattr(producer, "_clients", {}).values()
    clients.append(getattr(producer, "_default_client", None))
    writers: list[asyncio.StreamWriter] = []
    for client in clients:
        writer = getattr(getattr(client, "_conn", None), "_writer", None)
        if isinstance(writer, asyncio.StreamWriter) and writer not in writers:
            writers.append(writer)
    return writers


def describe(code: int) -> str:
    """The broker's response code with its name, e.g. ``2 (StreamDoesNotExist)``."""
    if code == CONNECTION_LOST:
        return f"{code} (the connection was lost before the broker answered)"
    return f"{code} ({ServerError.from_code(code).__name__})"


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an error, or the broker's code when it answered with one."""
    code = getattr(exc, "code", None) if isinstance(exc, ServerError) else None
    if not isinstance(code, int):
        return f"{type(exc).__name__}: {exc}"
    text = str(exc)
    return f"the broker answered code {describe(code)}" + (f": {text}" if text else "")
