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

log = logging.getLogger("nervus.transports.sqlite")


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
