"""Array parameters in PostgreSQL's binary format, built without a Python loop per element.

psycopg dumps a list parameter one element at a time in Python: with hundreds of
messages per append and six arrays per message, that was most of what publishing
cost the client. These builders write the same bytes the server's ``array_recv``
reads (dimensions, null flag, element type, then each element as its length and
its bytes) with ``struct``, ``map`` and ``bytes.join``, whose loops run in C.
Their dumpers, registered with psycopg's default adapters when this module is
imported (the types are nervus's own), send them as they are (``%b`` placeholders).
Text is sent as UTF-8: ``open_connection`` sets the client encoding to match.
"""

from __future__ import annotations

import struct
from itertools import chain, repeat
from typing import Any, ClassVar

import psycopg
from psycopg.adapt import Buffer, Dumper
from psycopg.pq import Format

_HEADER = struct.Struct(">5i")  # dimensions, has nulls, element type, length, lower bound
_EMPTY = struct.Struct(">3i")  # no dimensions, no nulls, element type
_LENGTH = struct.Struct(">i").pack
_NULL = _LENGTH(-1)


class BinaryArray:
    """A one-dimensional array in PostgreSQL's binary format (``data``)."""

    __slots__ = ("data",)
    oid: ClassVar[int]  # the array type
    element: ClassVar[int]  # the element type

    def __init__(self, data: bytes) -> None:
        self.data = data


class Int4Array(BinaryArray):
    __slots__ = ()
    oid, element = 1007, 23


class Int8Array(BinaryArray):
    __slots__ = ()
    oid, element = 1016, 20


class TextArray(BinaryArray):
    __slots__ = ()
    oid, element = 1009, 25


class ByteaArray(BinaryArray):
    __slots__ = ()
    oid, element = 1001, 17


def _header(cls: type[BinaryArray], length: int, nulls: bool = False) -> bytes:
    if not length:
        return _EMPTY.pack(0, 0, cls.element)
    return _HEADER.pack(1, nulls, cls.element, length, 1)


def int4_array(values: list[int]) -> Int4Array:
    n = len(values)
    pairs = chain.from_iterable(zip(repeat(4, n), values, strict=True))
    return Int4Array(_header(Int4Array, n) + struct.pack(f">{2 * n}i", *pairs))


def int8_array(values: list[int]) -> Int8Array:
    n = len(values)
    pairs = chain.from_iterable(zip(repeat(8, n), values, strict=True))
    return Int8Array(_header(Int8Array, n) + struct.pack(">" + "iq" * n, *pairs))


def _elements(header: bytes, values: list[bytes]) -> bytes:
    parts = [header]
    parts += chain.from_iterable(zip(map(_LENGTH, map(len, values)), values, strict=True))
    return b"".join(parts)


def bytea_array(values: list[bytes]) -> ByteaArray:
    return ByteaArray(_elements(_header(ByteaArray, len(values)), values))


def text_array(values: list[str | None]) -> TextArray:
    """Strings, or NULL for None."""
    if None not in values:
        encoded = [s.encode() for s in values]  # type: ignore[union-attr]
        return TextArray(_elements(_header(TextArray, len(values)), encoded))
    parts = [_header(TextArray, len(values), nulls=True)]
    for s in values:
        if s is None:
            parts.append(_NULL)
        else:
            b = s.encode()
            parts += (_LENGTH(len(b)), b)
    return TextArray(b"".join(parts))


class _Dumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: Any) -> Buffer:
        data: bytes = obj.data
        return data


for _cls in (Int4Array, Int8Array, TextArray, ByteaArray):
    psycopg.adapters.register_dumper(
        _cls, type(f"{_cls.__name__}Dumper", (_Dumper,), {"oid": _cls.oid})
    )
