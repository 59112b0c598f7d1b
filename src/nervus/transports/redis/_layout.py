"""Where nervus keeps things in Redis, and how stream entries and ids map to messages.

Keys (``P`` is the ``prefix`` option; ``%`` and ``:`` in channel and group names
are written ``%25`` and ``%3A`` so every key reads back unambiguously)::

    P:channel:CHANNEL              string  the channel's partition count
    P:stream:CHANNEL:N             stream  partition N of the channel; one consumer
                                           group per nervus group
    P:retry:GROUP:CHANNEL:N        zset    nacked entries of partition N waiting for
                                           redelivery: "ID|ATTEMPT" scored by due time (ms)
    P:group:GROUP:members          zset    live members scored by lease expiry (server ms)
    P:group:GROUP:subscribed       hash    member -> JSON list of its channels
    P:group:GROUP:owners           hash    "CHANNEL:N" -> member owning the partition
    P:group:GROUP:generation       string  bumped on every join, leave and release

An entry has the fields ``headers`` (a JSON object of strings: the CloudEvents
``ce_*`` attributes, ``content-type``, ``traceparent`` ...), ``body`` (the raw
bytes) and ``key`` (the partition key, absent when there is none).

Offsets: a stream id ``MS-SEQ`` is the offset ``MS << 20 | SEQ`` and back, so
offsets grow with ids and fit a signed 64-bit integer until the year 2248. Redis
gives one stream far fewer than 2**20 ids in one millisecond; a larger SEQ
(only possible with ids chosen by the writer) shares the offset ``MS << 20 | 0xFFFFF``.
"""

from __future__ import annotations

import logging

import msgspec

from nervus.transports._contract import Delivery

log = logging.getLogger("nervus.transports.redis")

SEQ_BITS = 20
SEQ_MASK = (1 << SEQ_BITS) - 1
MAX_SEQ = (1 << 64) - 1

HEADERS = b"headers"
BODY = b"body"
KEY = b"key"

headers_encoder = msgspec.json.Encoder()
headers_decoder = msgspec.json.Decoder(dict[str, str])


def escape(name: str) -> str:
    """A channel or group name as it appears inside a key (no bare ``:``)."""
    return name.replace("%", "%25").replace(":", "%3A")


class Keys:
    """The key names under one prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def channel(self, channel: str) -> str:
        return f"{self.prefix}:channel:{escape(channel)}"

    def stream(self, channel: str, partition: int) -> str:
        return f"{self.prefix}:stream:{escape(channel)}:{partition}"

    def retries(self, group: str, channel: str, partition: int) -> str:
        return f"{self.prefix}:retry:{escape(group)}:{escape(channel)}:{partition}"

    def group(self, group: str) -> list[str]:
        """The membership keys of a group: members, subscribed, owners, generation."""
        base = f"{self.prefix}:group:{escape(group)}"
        return [f"{base}:members", f"{base}:subscribed", f"{base}:owners", f"{base}:generation"]


def offset_of(entry_id: bytes) -> int:
    """The offset of a stream id ``MS-SEQ``."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms) << SEQ_BITS | min(int(seq), SEQ_MASK)


def id_of(offset: int) -> str:
    """The stream id of an offset (the inverse of ``offset_of``)."""
    return f"{offset >> SEQ_BITS}-{offset & SEQ_MASK}"


def id_before(offset: int) -> str:
    """The last possible stream id before the offset: a group whose last delivered id
    is this reads the offset's entry next."""
    ms, seq = offset >> SEQ_BITS, offset & SEQ_MASK
    if seq:
        return f"{ms}-{seq - 1}"
    if ms:
        return f"{ms - 1}-{MAX_SEQ}"
    return "0-0"


def append_args(key: str | None, headers: dict[str, str], body: bytes) -> tuple[bytes, ...]:
    """The arguments of a message to the ``APPEND`` script: headers, body, key flag, key."""
    if key is None:
        return (headers_encoder.encode(headers), body, b"", b"")
    return (headers_encoder.encode(headers), body, b"1", key.encode())


def delivery_of(
    channel: str,
    partition: int,
    entry_id: bytes,
    fields: dict[bytes, bytes],
    attempt: int,
    handle: object,
) -> Delivery:
    """The delivery of one stream entry."""
    raw = fields.get(HEADERS)
    headers: dict[str, str] = {}
    if raw is not None:
        try:
            headers = headers_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            log.warning(
                "entry %s of %s[%d] has a 'headers' field that is not a JSON object of "
                "strings (%s); delivering it without headers",
                entry_id.decode(),
                channel,
                partition,
                exc,
            )
    key = fields.get(KEY)
    offset = offset_of(entry_id)
    return Delivery(
        channel,
        partition,
        offset,
        None if key is None else key.decode(),
        headers,
        fields.get(BODY, b""),
        attempt,
        (offset >> SEQ_BITS) / 1000.0,
        handle,
    )
