"""Keyed concurrency: parallel across keys, strictly in order within a key.

Items with the same key run one at a time, in the order they were submitted;
items with different keys, and items without a key, run concurrently. A small
pool of long-lived worker tasks (grown on demand up to ``max_workers``) takes
work from a ready queue: a keyless item, or the first item of a key that was
idle. The worker that takes a key's first item drains that key's queue before
it takes other work, so a key is never handled by two workers at once and no
task is created per item.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("nervus.runtime")


class KeyedDispatcher(Generic[T]):
    """Runs ``handle(item)`` for every submitted item, ordered per key.

    ``handle`` should not raise; if it does, the error is logged and the key
    goes on with its next item. ``pending`` counts items submitted and not yet
    finished; ``wait_idle()`` returns when it reaches zero.
    """

    def __init__(self, handle: Callable[[T], Awaitable[None]], *, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers!r}: must be >= 1")
        self._handle = handle
        self._max_workers = max_workers
        self._ready: deque[tuple[str | None, T]] = deque()
        self._waiting: dict[str, deque[T]] = {}  # active key -> items after the running one
        self._idle: deque[asyncio.Future[None]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._pending = 0
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._closed = False

    @property
    def pending(self) -> int:
        """Items submitted and not yet finished."""
        return self._pending

    @property
    def active_keys(self) -> int:
        """Keys with an item running or queued."""
        return len(self._waiting)

    def submit(self, key: str | None, item: T) -> None:
        """Queue ``item``; it runs after every earlier item with the same ``key``."""
        if self._closed:
            raise RuntimeError("the dispatcher is closed")
        self._pending += 1
        self._idle_event.clear()
        if key is not None:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.append(item)
                return
            self._waiting[key] = deque()
        self._ready.append((key, item))
        self._wake()

    def _wake(self) -> None:
        while self._idle:
            fut = self._idle.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        if len(self._workers) < self._max_workers:
            task = asyncio.get_running_loop().create_task(self._work(), name="nervus-worker")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _work(self) -> None:
        ready = self._ready
        loop = asyncio.get_running_loop()
        while True:
            if not ready:
                if self._closed:
                    return
                fut: asyncio.Future[None] = loop.create_future()
                self._idle.append(fut)
                await fut
                continue
            key, item = ready.popleft()
            await self._run(item)
            if key is None:
                continue
            waiting = self._waiting[key]
            while waiting:
                await self._run(waiting.popleft())
            del self._waiting[key]

    async def _run(self, item: T) -> None:
        try:
            await self._handle(item)
        except Exception:
            log.exception("unexpected error while handling a delivery")
        finally:
            self._pending -= 1
            if self._pending == 0:
                self._idle_event.set()

    async def wait_idle(self) -> None:
        """Return once every submitted item has finished."""
        await self._idle_event.wait()

    async def close(self) -> int:
        """Stop the workers, cancelling items still running. Returns how many items
        were left unfinished (running or queued)."""
        self._closed = True
        left = self._pending
        for fut in self._idle:
            if not fut.done():
                fut.set_result(None)
        self._idle.clear()
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.gather(*workers, return_exceptions=True)
        self._ready.clear()
        self._waiting.clear()
        return left
