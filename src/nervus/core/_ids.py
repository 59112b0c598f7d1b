"""UUIDv7 identifiers (RFC 9562): time-ordered, unique across processes."""

from __future__ import annotations

import os
import threading
import uuid
from time import time_ns

_RANDOM_HALVES = 1024  # random halves made at a time
_COUNTER_HEX = tuple(f"{n:03x}-" for n in range(0x1000))
_SET_VARIANT = bytes(0x80 | (n & 0x3F) for n in range(256))  # a byte with its top bits 0b10

_lock = threading.Lock()
_halves: list[str] = []
"""Random halves of ids not yet used, as text: ``vxxx-xxxxxxxxxxxx`` (62 random bits)."""
_ms = 0  # the millisecond of the last id
_next_ms_ns = 0  # the time_ns() at which the millisecond after it begins
_counter = 0  # the 12-bit counter of the last id
_prefix = ""  # the text of _ms and the version: ``tttttttt-tttt-7``


def _forget_state() -> None:
    """A forked child must not reuse its parent's random halves, counter or lock."""
    global _lock, _next_ms_ns
    _lock = threading.Lock()
    _halves.clear()
    _next_ms_ns = 0


os.register_at_fork(after_in_child=_forget_state)


def _random_half() -> str:
    """The next unused random half (the lock is held). Made 1,024 at a time from
    ``os.urandom``, by bytes and string operations that loop in C."""
    if not _halves:
        # per id 2 bytes, the first with the variant bits set, and 6 bytes:
        # the text "vxxx" and "xxxxxxxxxxxx", joined by "-"
        first = bytearray(os.urandom(2 * _RANDOM_HALVES))
        first[::2] = first[::2].translate(_SET_VARIANT)
        rest = os.urandom(6 * _RANDOM_HALVES)
        pairs = zip(first.hex(" ", 2).split(), rest.hex(" ", 6).split(), strict=True)
        _halves.extend(map("-".join, pairs))
    return _halves.pop()


def _enter_millisecond(ms: int, counter: int) -> None:
    """Make ``ms`` the millisecond of the next ids, counting from ``counter`` (the lock is held)."""
    global _ms, _next_ms_ns, _counter, _prefix
    h = f"{ms:012x}"
    _ms, _next_ms_ns, _counter, _prefix = ms, (ms + 1) * 1_000_000, counter, f"{h[:8]}-{h[8:]}-7"


def new_id() -> str:
    """A new message id: a UUIDv7 (RFC 9562) in its canonical text form.

    48-bit Unix milliseconds, version 7, a 12-bit counter, the variant, 62 random
    bits. The counter is seeded at random each millisecond and counts up within it
    (RFC 9562 method 1); when it runs out the ids borrow the next millisecond, so
    within one process ids strictly increase, even if the clock steps back. Random
    bits come from ``os.urandom``, made into text in batches; the text of the
    millisecond is made once per millisecond.
    """
    global _counter
    lock = _lock
    lock.acquire()  # not ``with``: half the cost, on every publish's path
    try:
        half = _halves.pop() if _halves else _random_half()
        now = time_ns()
        if now < _next_ms_ns:  # within the millisecond of the last id, or before it
            counter = _counter = _counter + 1
            if counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                counter = 0
                _enter_millisecond(_ms + 1, counter)
        else:
            counter = int(_random_half()[5:8], 16) & 0x7FF
            _enter_millisecond(now // 1_000_000, counter)
        return f"{_prefix}{_COUNTER_HEX[counter]}{half}"
    finally:
        lock.release()


def uuid7() -> uuid.UUID:
    """A new UUIDv7 (RFC 9562) as a ``uuid.UUID``: the id ``new_id`` would give."""
    return uuid.UUID(new_id())


def uuid7_time_ms(value: uuid.UUID | str) -> int:
    """The Unix millisecond timestamp embedded in a UUIDv7."""
    u = uuid.UUID(value) if isinstance(value, str) else value
    return u.int >> 80
