"""Noticing commits of other processes without waking the event loop for nothing.

A thread of its own, with a connection of its own, reads ``PRAGMA data_version``
every ``poll_interval`` while some fetch waits, and calls back into the event
loop only when the value moved (another connection committed). Asking from the
loop through an executor each time would cost two thread switches and a loop
wake-up per check, a noticeable share of a core for an idle consumer.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable

log = logging.getLogger("nervus.sql")


class ChangeWatcher:
    """Calls ``on_change`` on ``loop`` when another connection commits, while active."""

    def __init__(
        self,
        path: str,
        interval: float,
        busy_timeout: float,
        loop: asyncio.AbstractEventLoop,
        on_change: Callable[[], None],
    ) -> None:
        self._path = path
        self._interval = interval
        self._busy_timeout = busy_timeout
        self._loop = loop
        self._on_change = on_change
        self._active = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nervus-sqlite-watch", daemon=True)
        self._thread.start()

    def activate(self) -> None:
        """Check while fetches wait; ``deactivate`` when none does."""
        self._active.set()

    def deactivate(self) -> None:
        self._active.clear()

    def stop(self) -> None:
        self._stopped.set()
        self._active.set()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
        except sqlite3.Error:
            log.warning("cannot watch %s for changes", self._path, exc_info=True)
            return
        try:
            last = _data_version(conn)
            while not self._stopped.is_set():
                self._active.wait()
                # time.sleep: a timed Event.wait costs about twice the CPU per wake-up
                time.sleep(self._interval)
                if self._stopped.is_set():
                    break
                try:
                    version = _data_version(conn)
                except sqlite3.Error:
                    version = -1  # could not tell: let the waiters look
                if version != last:
                    last = version
                    try:
                        self._loop.call_soon_threadsafe(self._on_change)
                    except RuntimeError:  # the loop is closed
                        break
        finally:
            conn.close()


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


class Changes:
    """Wakes waiters of one process when the database may have changed: at once after
    a commit of this process (``notify``), within ``poll_interval`` after another
    process's (through a ``ChangeWatcher`` that runs only while someone waits)."""

    def __init__(self, path: str, *, poll_interval: float, busy_timeout: float) -> None:
        self._path = path
        self._poll_interval = poll_interval
        self._busy_timeout = busy_timeout
        self.version = 0  # moves on every change signalled
        self._change: asyncio.Future[None] | None = None
        self._watcher: ChangeWatcher | None = None
        self._waiters = 0
        self._closed = False

    def notify(self) -> None:
        """Something may have changed: waiters look again."""
        self.version += 1
        change, self._change = self._change, None
        if change is not None and not change.done():
            change.set_result(None)

    async def wait(self, seen: int, longest: float) -> None:
        """Wait up to ``longest`` s, unless a change was signalled since ``version``
        was ``seen``."""
        if self.version != seen or self._closed:
            return
        if self._change is None:
            self._change = asyncio.get_running_loop().create_future()
        change = self._change
        if self._watcher is None:
            self._watcher = ChangeWatcher(
                self._path,
                self._poll_interval,
                self._busy_timeout,
                asyncio.get_running_loop(),
                self.notify,
            )
        self._waiters += 1
        self._watcher.activate()
        try:
            await asyncio.wait([change], timeout=longest)
        finally:
            self._waiters -= 1
            if not self._waiters:
                self._watcher.deactivate()

    def close(self) -> None:
        """Stop watching and release every waiter."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.stop()
        self.notify()
