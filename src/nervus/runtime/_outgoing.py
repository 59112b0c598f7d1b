"""Typed events -> envelopes -> transport messages, grouped per channel."""

from __future__ import annotations

from collections.abc import Iterable

from nervus.codecs import JSON_CODEC
from nervus.core import Envelope, Message, channel_of, type_name
from nervus.transports import OutgoingMessage


def encode(
    event: Message,
    *,
    source: str,
    key: str | None = None,
    subject: str | None = None,
    cause: Envelope | None = None,
) -> tuple[str, OutgoingMessage]:
    """The channel and the message that carry ``event``.

    The partition key is ``key`` or else ``event.partition_key()``; it is also the
    envelope's ``partitionkey``. With a ``cause`` the message joins its
    conversation (correlation id, causation id, trace context).
    """
    cls = type(event)
    if not isinstance(event, Message):
        raise TypeError(
            f"cannot publish {cls.__qualname__}: publish instances of Event or Command "
            "subclasses declared with type=..."
        )
    partition_key = key if key is not None else event.partition_key()
    data = JSON_CODEC.encode(event)
    envelope = Envelope.new(
        type=type_name(cls),
        source=source,
        data=data,
        subject=subject,
        partitionkey=partition_key,
        cause=cause,
        datacontenttype=JSON_CODEC.content_type,
    )
    return channel_of(cls), OutgoingMessage(
        key=partition_key, headers=envelope.to_headers(), body=data
    )


def group_by_channel(
    messages: Iterable[tuple[str, OutgoingMessage]],
) -> dict[str, list[OutgoingMessage]]:
    """Messages per channel, keeping their order within each channel."""
    batches: dict[str, list[OutgoingMessage]] = {}
    for channel, message in messages:
        batch = batches.get(channel)
        if batch is None:
            batches[channel] = [message]
        else:
            batch.append(message)
    return batches
