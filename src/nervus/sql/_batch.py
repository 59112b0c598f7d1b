"""Group commit on the event loop: operations submitted while a transaction runs go
together into the next one.

``GroupCommit(run)`` calls ``run(operations)`` with everything queued so far and
expects one result per operation, in order. A result that is an exception is
raised to that operation's caller alone; an exception raised by ``run`` itself
fails the whole group, and then each operation is tried again in a group of its
own (so one bad operation does not fail the others), unless the error is
retryable (the database is gone: trying each alone would only wait longer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from nervus.errors import NervusError

Op = TypeVar("Op")
R = TypeVar("R")


class GroupCommit(Generic[Op, R]):
    """Coalesces concurrent ``submit`` calls into few ``run`` calls, one at a time."""

    def __init__(
        self,
        run: Callable[[Sequence[Op]], Awaitable[Sequence[R | BaseException]]],
        *,
        interrupted: Callable[[], BaseException],
    ) -> None:
        self._run = run
        self._interrupted = interrupted  # what waiting callers get if the loop stops
        self._queue: list[tuple[Op, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None
        self.groups = 0  # ``run`` calls that succeeded; shows how well calls coalesce

    async def submit(self, op: Op) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        # shield: a caller that gives up does not cancel the others' transaction
        return await asyncio.shield(fut)

    async def drain(self) -> None:
        """Wait until what was submitted so far has run."""
        task = self._task
        if task is not None:
            await asyncio.wait([task])

    async def _drain(self) -> None:
        batch: list[tuple[Op, asyncio.Future[R]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._group(batch)
                batch = []
        except BaseException:
            for _, fut in batch + self._queue:
                _settle(fut, self._interrupted())
            self._queue = []
            raise
        finally:
            self._task = None

    async def _group(self, batch: list[tuple[Op, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([op for op, _ in batch])
        except Exception as exc:
            if len(batch) == 1 or (isinstance(exc, NervusError) and exc.retryable):
                for _, fut in batch:
                    _settle(fut, exc)
                return
            for item in batch:
                await self._group([item])
            return
        self.groups += 1
        for (_, fut), result in zip(batch, results, strict=True):
            _settle(fut, result)


def _settle(fut: asyncio.Future[R], result: R | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
