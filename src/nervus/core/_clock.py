"""Clocks: the system clock and a manual one for tests of timers and backoff."""

from __future__ import annotations

import asyncio
import time
from time import time_ns
from typing import Protocol


class Clock(Protocol):
    """Where nervus reads the time and sleeps; swap it to test time-based behaviour."""

    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to; sleepers wake when it passes their deadline."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._mono + seconds, fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has passed."""
        self._now += seconds
        self._mono += seconds
        due = [f for d, f in self._sleepers if d <= self._mono]
        self._sleepers = [(d, f) for d, f in self._sleepers if d > self._mono]
        for fut in due:
            if not fut.done():
                fut.set_result(None)
        await asyncio.sleep(0)


SYSTEM_CLOCK = SystemClock()


_MICROS = tuple(f"{n:03d}Z" for n in range(1000))
_millisecond: tuple[int, int, str] = (0, 0, "")
"""The millisecond of the last ``rfc3339_now``: where it begins and ends in
``time_ns()`` and its text up to the milliseconds (one tuple: threads read it whole)."""
_second: tuple[int, str] = (0, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(0)))
"""The second of the last millisecond made and its text."""


def rfc3339_now() -> str:
    """The current UTC time as RFC 3339 text with microseconds: ``2026-11-26T16:30:00.123456Z``.

    The text up to the millisecond is made once per millisecond; the microseconds
    come from a table.
    """
    ns = time_ns()
    start, end, text = _millisecond
    if not start <= ns < end:
        start, end, text = _enter_millisecond(ns)
    return text + _MICROS[(ns - start) // 1000]


def _enter_millisecond(ns: int) -> tuple[int, int, str]:
    """Make the millisecond of ``ns`` the current one; the date and time up to the
    second are formatted once per second."""
    global _millisecond, _second
    ms = ns // 1_000_000
    second, millis = divmod(ms, 1000)
    known, text = _second
    if second != known:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second, text
    start = ms * 1_000_000
    _millisecond = current = (start, start + 1_000_000, f"{text}.{millis:03d}")
    return current
