"""AMQP 0-9-1 on the wire: frames, field tables, and the methods nervus encodes
and decodes itself (the publisher's messages, the stream reader's connection).

A frame is ``type (1) channel (2) size (4) payload (size) 0xCE``; a method
frame's payload starts with its class and method ids (2 bytes each), then the
method's arguments. A message is a method frame, a content-header frame (class,
weight, body size, property flags, the properties present) and as many body
frames as the body needs (none for an empty body, one per ``frame_max`` bytes).

Field tables follow RabbitMQ's reading of the specification (its errata, which
every client follows): a name (short string), a type byte, a value.

=====  ===================================  =====  ===================================
type   value                                type   value
=====  ===================================  =====  ===================================
``t``  boolean (1 byte)                     ``f``  32-bit float
``b``  signed 8-bit                         ``d``  64-bit float
``B``  unsigned 8-bit                       ``D``  decimal: scale (1 byte), unsigned 32
``s``  signed 16-bit (RabbitMQ's)           ``S``  long string: UTF-8 text (bytes if not)
``U``  signed 16-bit (the specification's)  ``x``  byte array (bytes)
``u``  unsigned 16-bit                      ``T``  timestamp: seconds, as a UTC datetime
``I``  signed 32-bit                        ``F``  nested table (dict)
``i``  unsigned 32-bit                      ``A``  array: values with their type bytes
``l``  signed 64-bit (RabbitMQ's)           ``V``  void (None)
``L``  signed 64-bit (the specification's)
=====  ===================================  =====  ===================================

RabbitMQ sends a stream message's ``x-stream-offset`` as ``l``. Timestamps above
2**32 are taken as milliseconds, as the common Python clients read them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pamqp.encode import encode_table_value

FRAME = struct.Struct(">BHI")  # type, channel, payload size
FRAME_HEADER = FRAME.size
FRAME_END = b"\xce"
FRAME_END_BYTE = 0xCE
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
HEARTBEAT_FRAME = FRAME.pack(HEARTBEAT, 0, 0) + FRAME_END
MIN_FRAME_MAX = 4096
"""The largest frame a peer may send before the connection is tuned."""

CONTENT_HEADER = struct.Struct(">HHQH")  # class, weight, body size, property flags
BASIC = 60
# Property flags of Basic's content header, in the order the properties follow it.
CONTENT_TYPE, CONTENT_ENCODING, HEADERS, DELIVERY_MODE = 0x8000, 0x4000, 0x2000, 0x1000
MESSAGE_ID = 0x0080
MAX_FIELD_NAME = 128

_OCTET = struct.Struct(">B")
_SHORT = struct.Struct(">H")
_LONG = struct.Struct(">I")
_LONG_LONG = struct.Struct(">q")
_UNSIGNED_LONG_LONG = struct.Struct(">Q")


def short_string(text: str, what: str) -> bytes:
    """``text`` as an AMQP short string; ``ValueError`` naming ``what`` if over 255 bytes."""
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"{what} {text[:60]!r}... is longer than AMQP's 255 bytes")
    return bytes((len(data),)) + data


def long_string(data: bytes) -> bytes:
    return _LONG.pack(len(data)) + data


def field_table(headers: Mapping[str, object]) -> bytes:
    """``headers`` as an AMQP field table: strings as long strings, integers as
    signed 64-bit values, anything else as pamqp encodes it."""
    parts: list[bytes] = []
    append = parts.append
    for name, value in headers.items():
        key = name.encode()
        if len(key) > MAX_FIELD_NAME:
            raise ValueError(
                f"header name {name[:60]!r}... is longer than AMQP's {MAX_FIELD_NAME} bytes"
            )
        if type(value) is str:
            data = value.encode()
            append(bytes((len(key),)) + key + b"S" + _LONG.pack(len(data)) + data)
        elif type(value) is int:
            append(bytes((len(key),)) + key + b"l" + _LONG_LONG.pack(value))
        else:
            append(bytes((len(key),)) + key + encode_table_value(value))  # type: ignore[arg-type]
    table = b"".join(parts)
    return _LONG.pack(len(table)) + table


def method(channel: int, class_id: int, method_id: int, arguments: bytes = b"") -> bytes:
    """A method frame on ``channel``."""
    return (
        FRAME.pack(METHOD, channel, 4 + len(arguments))
        + _SHORT.pack(class_id)
        + _SHORT.pack(method_id)
        + arguments
        + FRAME_END
    )


# -- decoding --------------------------------------------------------------------
# Each reader takes the bytes and the position of the value, and returns the
# value and the position after it. ``struct.error`` or ``IndexError`` means the
# data ended early; the callers turn them into a protocol error.

_unpack_long = _LONG.unpack_from
_unpack_long_long = _LONG_LONG.unpack_from
_unpack_short = _SHORT.unpack_from
_FIXED = {
    ord("b"): (struct.Struct(">b"), 1),
    ord("B"): (_OCTET, 1),
    ord("s"): (struct.Struct(">h"), 2),
    ord("U"): (struct.Struct(">h"), 2),
    ord("u"): (_SHORT, 2),
    ord("I"): (struct.Struct(">i"), 4),
    ord("i"): (_LONG, 4),
    ord("l"): (_LONG_LONG, 8),
    ord("L"): (_LONG_LONG, 8),
    ord("f"): (struct.Struct(">f"), 4),
    ord("d"): (struct.Struct(">d"), 8),
}
"""The fixed-size types: their layout and size."""

_S, _L_LOWER = ord("S"), ord("l")
_MILLISECONDS_ABOVE = 0xFFFFFFFF


def decode_short_string(data: bytes, pos: int) -> tuple[str, int]:
    end = pos + 1 + data[pos]
    if end > len(data):
        raise ValueError(f"a short string at byte {pos} runs past the end of the data")
    return data[pos + 1 : end].decode("utf-8", "replace"), end


def decode_long_string(data: bytes, pos: int) -> tuple[bytes, int]:
    (size,) = _unpack_long(data, pos)
    end = pos + 4 + size
    if end > len(data):
        raise ValueError(f"a long string at byte {pos} runs past the end of the data")
    return data[pos + 4 : end], end


def decode_table(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """The field table at ``pos`` of ``data`` and the position after it;
    ``ValueError`` naming the problem when it is malformed."""
    (size,) = _unpack_long(data, pos)
    pos += 4
    end = pos + size
    if end > len(data):
        raise ValueError(f"a field table of {size} bytes at byte {pos - 4} runs past the data")
    table: dict[str, Any] = {}
    while pos < end:
        name_end = pos + 1 + data[pos]
        name = data[pos + 1 : name_end].decode("utf-8", "replace")
        kind = data[name_end]
        pos = name_end + 1
        if kind == _S:  # the usual case first: a string header
            (length,) = _unpack_long(data, pos)
            raw = data[pos + 4 : pos + 4 + length]
            pos += 4 + length
            try:
                table[name] = raw.decode()
            except UnicodeDecodeError:
                table[name] = raw
        elif kind == _L_LOWER:
            (table[name],) = _unpack_long_long(data, pos)
            pos += 8
        else:
            table[name], pos = _decode_value(kind, data, pos)
    if pos != end:
        raise ValueError(f"a field table's values run past its end (byte {end})")
    return table, end


def _decode_value(kind: int, data: bytes, pos: int) -> tuple[Any, int]:
    fixed = _FIXED.get(kind)
    if fixed is not None:
        layout, size = fixed
        return layout.unpack_from(data, pos)[0], pos + size
    if kind == _S:
        raw, pos = decode_long_string(data, pos)
        try:
            return raw.decode(), pos
        except UnicodeDecodeError:
            return raw, pos
    if kind == 116:  # t
        return data[pos] != 0, pos + 1
    if kind == 120:  # x
        return decode_long_string(data, pos)
    if kind == 70:  # F
        return decode_table(data, pos)
    if kind == 65:  # A
        return _decode_array(data, pos)
    if kind == 84:  # T
        (seconds,) = _UNSIGNED_LONG_LONG.unpack_from(data, pos)
        return _timestamp(seconds), pos + 8
    if kind == 68:  # D
        scale = data[pos]
        (digits,) = _unpack_long(data, pos + 1)
        return Decimal(digits).scaleb(-scale), pos + 5
    if kind in (86, 0):  # V, and the zero byte some clients send for it
        return None, pos
    raise ValueError(f"unknown field type {bytes((kind,))!r} at byte {pos - 1}")


def _decode_array(data: bytes, pos: int) -> tuple[list[Any], int]:
    (size,) = _unpack_long(data, pos)
    pos += 4
    end = pos + size
    if end > len(data):
        raise ValueError(f"a field array of {size} bytes at byte {pos - 4} runs past the data")
    values: list[Any] = []
    while pos < end:
        value, pos = _decode_value(data[pos], data, pos + 1)
        values.append(value)
    if pos != end:
        raise ValueError(f"a field array's values run past its end (byte {end})")
    return values, end


def _timestamp(seconds: int) -> datetime | int:
    """A UTC datetime, or the number itself when no datetime can hold it."""
    value = seconds / 1000 if seconds > _MILLISECONDS_ABOVE else seconds
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return seconds
