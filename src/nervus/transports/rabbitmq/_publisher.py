"""Publishing control messages (redeliveries, through the delay and retry queues)
over AMQP 0-9-1 with publisher confirms, many messages per socket write;
channel messages go over the stream protocol instead (``_streams.py``).

aio-pika's ``Exchange.publish`` hands the connection one message at a time and
waits until it is written before the next one goes: a socket write per message,
and a broker that then confirms nearly every message on its own. ``Publisher``
encodes the frames of each message itself (``Basic.Publish``, content header,
body: what the client would send) and hands the connection's writer, in one
write, every message published during one turn of the event loop — all of one
``publish`` call and of the calls made concurrently; calls made while a write
waits for the writer join the next write, as the SQLite log commits concurrent
calls together. Each message gets the channel's next delivery tag and a
confirmation future registered with the channel, which resolves it when the
broker's ``Basic.Ack`` (or ``Basic.Nack``) arrives, usually one ``multiple``
acknowledgement for many messages, and rejects it when the channel closes.

The channel must be in confirm mode. A write numbers its messages and queues
them while holding the channel's lock, as the client's own ``basic_publish``
does, so delivery tags follow the order in which messages reach the broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel

from nervus.transports.rabbitmq._amqp import (
    BASIC,
    BODY,
    CONTENT_HEADER,
    CONTENT_TYPE,
    DELIVERY_MODE,
    FRAME,
    FRAME_END,
    HEADER,
    HEADERS,
    MESSAGE_ID,
    METHOD,
    field_table,
    short_string,
)

_BASIC_PUBLISH = b"\x00\x3c\x00\x28\x00\x00"  # class 60, method 40, reserved ticket 0
_NOT_MANDATORY = b"\x00"  # neither mandatory nor immediate
_PERSISTENT = b"\x02"


class Publisher:
    """Publishes persistent messages on one confirm-mode channel (see the module)."""

    def __init__(self, channel: aiormq.Channel, owner: object = None) -> None:
        self.channel = channel
        self._owner = owner  # the client's object for the channel, kept alive with it
        self._number = channel.number
        self._max_body = channel.max_content_size
        self._frames: list[bytes] = []
        self._futures: list[asyncio.Future[object]] = []
        self._writing: asyncio.Task[None] | None = None

    @property
    def is_closed(self) -> bool:
        return self.channel.is_closed

    @staticmethod
    def target(exchange: str) -> bytes:
        """The start of ``Basic.Publish`` to ``exchange``, given to ``encode``."""
        return _BASIC_PUBLISH + short_string(exchange, "exchange name")

    def encode(
        self,
        target: bytes,
        routing_key: str,
        headers: Mapping[str, object],
        body: bytes,
        message_id: str | None = None,
        content_type: str | None = None,
    ) -> bytes:
        """The frames of one persistent message; ``message_id`` and ``content_type``
        become properties when they fit in a short string."""
        frame, number = FRAME.pack, self._number
        method = target + short_string(routing_key, "routing key") + _NOT_MANDATORY
        flags = HEADERS | DELIVERY_MODE
        properties = field_table(headers) + _PERSISTENT
        if content_type is not None:
            data = content_type.encode()
            if len(data) <= 255:
                flags |= CONTENT_TYPE
                properties = bytes((len(data),)) + data + properties
        if message_id is not None:
            data = message_id.encode()
            if len(data) <= 255:
                flags |= MESSAGE_ID
                properties += bytes((len(data),)) + data
        header = CONTENT_HEADER.pack(BASIC, 0, len(body), flags) + properties
        parts = [
            frame(METHOD, number, len(method)),
            method,
            FRAME_END,
            frame(HEADER, number, len(header)),
            header,
            FRAME_END,
        ]
        step = self._max_body
        for start in range(0, len(body), step):
            chunk = body[start : start + step]
            parts += (frame(BODY, number, len(chunk)), chunk, FRAME_END)
        return b"".join(parts)

    def send(self, messages: list[bytes]) -> list[asyncio.Future[object]]:
        """Queue encoded messages for the next write; return their confirmations."""
        create = self.channel.create_future
        futures: list[asyncio.Future[object]] = [create() for _ in messages]
        self._frames += messages
        self._futures += futures
        if self._writing is None:
            self._writing = asyncio.get_running_loop().create_task(self._write())
        return futures

    async def _write(self) -> None:
        channel = self.channel
        try:
            while self._frames:
                frames, self._frames = self._frames, []
                futures, self._futures = self._futures, []
                try:
                    async with channel.lock:
                        first = channel.delivery_tag + 1
                        last = first + len(futures) - 1
                        confirmations = channel.confirmations
                        for tag, future in enumerate(futures, first):
                            confirmations[tag] = future
                        channel.delivery_tag = last
                        try:
                            await channel.write_queue.put(
                                aiormq.abc.ChannelFrame(
                                    payload=b"".join(frames), should_close=False
                                )
                            )
                        except BaseException:
                            # the broker saw none of them: give their tags back
                            for tag in range(first, last + 1):
                                confirmations.pop(tag, None)
                            channel.delivery_tag = first - 1
                            raise
                except BaseException as exc:
                    for future in futures:
                        if future.done():
                            continue
                        if isinstance(exc, Exception):
                            future.set_exception(exc)
                        else:
                            future.cancel()
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._writing = None


async def confirmed(futures: list[asyncio.Future[object]]) -> list[BaseException]:
    """Wait for every confirmation; return the errors of those that failed."""
    failed: list[BaseException] = []
    for future in futures:
        try:
            await future
        except Exception as exc:
            failed.append(exc)
    return failed


async def publisher_on(channel: AbstractChannel) -> Publisher:
    """A ``Publisher`` on a confirm-mode channel the client opened."""
    underlay = await channel.get_underlay_channel()
    if not isinstance(underlay, aiormq.Channel):
        raise TypeError(f"expected an aiormq channel, got {type(underlay).__name__}")
    return Publisher(underlay, channel)
