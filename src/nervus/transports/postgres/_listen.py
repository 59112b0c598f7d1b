"""Waking consumers through LISTEN/NOTIFY.

One connection per transport listens on the schema's channel. Publishing
transactions notify ``c:<channel id>`` and group changes ``g:<generation>:<group>``;
the server delivers each notification after its transaction commits. When the
connection drops, the listener reconnects (backing off up to two seconds) and
reports a change, since notifications sent meanwhile were lost; consumers also
look every ``poll_interval`` on their own. A lost connection is reported to the
transport's ``Reachability``, which logs an outage once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql

from nervus.transports.postgres._database import Reachability, open_connection


class Listener:
    """Calls ``on_notify(payload)`` for every notification on ``channel``, and
    ``on_notify(None)`` after reconnecting (something may have been missed)."""

    def __init__(
        self,
        conninfo: str,
        channel: str,
        *,
        timeout: float,
        on_notify: Callable[[str | None], None],
        reachability: Reachability,
    ) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._timeout = timeout
        self._on_notify = on_notify
        self._reachability = reachability
        self._opened_at = 0
        self._conn: AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and LISTEN (errors are raised here), then listen in a task."""
        self._conn = await self._listen()
        self._opened_at = self._reachability.reached()
        self._task = asyncio.create_task(self._run())

    async def _listen(self) -> AsyncConnection[Any]:
        async with asyncio.timeout(self._timeout):
            conn = await open_connection(self._conninfo, timeout=self._timeout)
            try:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            except BaseException:
                await conn.close()
                raise
        return conn

    async def _run(self) -> None:
        pause = 0.1
        while True:
            conn = self._conn
            if conn is None:
                try:
                    conn = self._conn = await self._listen()
                except (psycopg.Error, TimeoutError) as exc:
                    failure = exc if str(exc) else TimeoutError(f"no answer in {self._timeout}s")
                    self._reachability.lost(None, failure)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2.0)
                    continue
                pause = 0.1
                self._opened_at = self._reachability.reached()
                self._on_notify(None)
            try:
                async for notify in conn.notifies():
                    self._on_notify(notify.payload)
            except psycopg.Error as exc:
                self._reachability.lost(self._opened_at, exc)
            self._conn = None
            with contextlib.suppress(psycopg.Error):
                await conn.close()
            self._on_notify(None)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
