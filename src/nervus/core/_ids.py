"""UUIDv7 identifiers (RFC 9562): time-ordered, unique across processes."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> uuid.UUID:
    """A new UUIDv7. Within one process ids are strictly increasing.

    Layout: 48-bit Unix milliseconds, version 7, a 12-bit counter seeded at random
    each millisecond (``rand_a``, RFC 9562 method 1), variant, 62 random bits.
    """
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = int.from_bytes(os.urandom(2)) & 0x7FF
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        counter = _counter
    rand_b = int.from_bytes(os.urandom(8)) & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def new_id() -> str:
    """A new message id: a UUIDv7 in its canonical text form."""
    return str(uuid7())


def uuid7_time_ms(value: uuid.UUID | str) -> int:
    """The Unix millisecond timestamp embedded in a UUIDv7."""
    u = uuid.UUID(value) if isinstance(value, str) else value
    return u.int >> 80
