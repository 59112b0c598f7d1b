"""Reading the next page of a subscription while the subscriber handles this one.

A subscriber that got a full batch probably has more to read (it is catching up):
the PostgreSQL store starts reading the next batch at once, so the server's work
overlaps the subscriber's own, and the batch is often there when it asks (the
SQLite store reads on the event loop's thread: nothing would overlap). A batch
that was not full starts nothing: at the head of the log, a subscriber waits for
new events as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from nervus.storage._contract import RecordedEvent

_Read = Coroutine[Any, Any, list[RecordedEvent]]


class ReadAhead:
    """At most one read started early, with the change counter seen when it started."""

    def __init__(self) -> None:
        self._task: asyncio.Task[list[RecordedEvent]] | None = None
        self._seen = 0

    def start(self, read: _Read, seen: int) -> None:
        self.cancel()
        self._task = asyncio.ensure_future(read)
        self._seen = seen

    async def take(self, read: Callable[[], _Read], seen: int) -> tuple[int, list[RecordedEvent]]:
        """The read started early, or ``read()`` now: (change counter before it, events)."""
        task, self._task = self._task, None
        if task is None:
            return seen, await read()
        return self._seen, await task

    def cancel(self) -> None:
        """Drop a read started early (the subscriber stopped)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Task[list[RecordedEvent]]) -> None:
    if not task.cancelled():
        task.exception()  # nobody waits for it: no "exception never retrieved" warning
