"""UUIDv7 identifiers (RFC 9562): time-ordered, unique across processes."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0
_random = b""
_random_at = 0
_RANDOM_BATCH = 8192  # bytes of os.urandom fetched at once: one system call per 1,024 ids


def _forget_random() -> None:
    """A forked child must not reuse its parent's random bytes (or its counter state)."""
    global _random, _random_at, _last_ms
    _random, _random_at, _last_ms = b"", 0, 0


os.register_at_fork(after_in_child=_forget_random)


def _uuid7_int() -> int:
    """The 128 bits of a new UUIDv7.

    Layout: 48-bit Unix milliseconds, version 7, a 12-bit counter seeded at random
    each millisecond (``rand_a``, RFC 9562 method 1), variant, 62 random bits from
    ``os.urandom``. Within one process values strictly increase.
    """
    global _last_ms, _counter, _random, _random_at
    with _lock:
        ms = time.time_ns() // 1_000_000
        if _random_at + 10 > len(_random):
            _random, _random_at = os.urandom(_RANDOM_BATCH), 0
        chunk = _random[_random_at : _random_at + 10]
        _random_at += 10
        if ms > _last_ms:
            _last_ms = ms
            _counter = int.from_bytes(chunk[8:10]) & 0x7FF
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        counter = _counter
    rand_b = int.from_bytes(chunk[:8]) & 0x3FFF_FFFF_FFFF_FFFF
    return (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b


def uuid7() -> uuid.UUID:
    """A new UUIDv7."""
    return uuid.UUID(int=_uuid7_int())


def new_id() -> str:
    """A new message id: a UUIDv7 in its canonical text form."""
    h = "%032x" % _uuid7_int()  # noqa: UP031 - the fastest way to 32 hex digits
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_time_ms(value: uuid.UUID | str) -> int:
    """The Unix millisecond timestamp embedded in a UUIDv7."""
    u = uuid.UUID(value) if isinstance(value, str) else value
    return u.int >> 80
