"""A member of a consumer group on the SQLite log."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from nervus.transports._contract import (
    DeadLetterReason,
    Delivery,
    Subscription,
    dead_letter_channel,
    dead_letter_message,
    ensure_open,
)
from nervus.transports._table_log import OwnedPartition, RetryHandle, admit, settle_in_log
from nervus.transports.sqlite import _membership
from nervus.transports.sqlite._fetch import poll
from nervus.transports.sqlite._membership import PartitionKey

if TYPE_CHECKING:
    from nervus.transports.sqlite._transport import SqliteTransport

log = logging.getLogger("nervus.transports.sqlite")


class SqliteSubscription(Subscription):
    """Owns partitions by lease, fetches from its committed positions, commits
    settled positions in batches (at most every ``commit_interval`` seconds)."""

    def __init__(
        self,
        transport: SqliteTransport,
        group: str,
        channels: Mapping[str, tuple[int, int]],
        member: str,
    ) -> None:
        self.group = group
        self.channels = tuple(channels)
        self._transport = transport
        self._settings = transport.settings
        self._channel_ids = dict(channels)
        self._names = {cid: name for name, (cid, _) in channels.items()}
        self._member = member
        self._owned: dict[tuple[str, int], OwnedPartition] = {}
        self._positions: dict[PartitionKey, int] = {}
        self._retries_done: list[tuple[int, int, int]] = []
        self._retries_in_flight: set[tuple[int, int, int]] = set()
        self._retry_due: float | None = None
        self._generation = -1
        self._rotation = 0
        self._closed = False
        self._lease_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._commit_timer: asyncio.TimerHandle | None = None
        self._last_commit = 0.0
        self._renewed_at = time.monotonic()

    @property
    def member(self) -> str:
        """This member's id in the group (host, process and a random part)."""
        return self._member

    async def start(self) -> None:
        await self._renew()
        self._lease_task = asyncio.create_task(self._lease_loop())

    # -- fetching ---------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        ensure_open(self._closed, f"subscription of group {self.group!r}")
        if max_messages <= 0:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        transport = self._transport
        while True:
            seen = transport.change_version
            out = await self._poll(max_messages)
            if out or self._closed:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            if self._retry_due is not None:
                remaining = min(remaining, max(self._retry_due - time.time(), 0.0))
            await transport.wait_for_change(seen, remaining)
            if self._closed:
                return []  # closed while waiting

    async def _poll(self, limit: int) -> list[Delivery]:
        owned = list(self._owned.values())
        if time.monotonic() - self._renewed_at > self._settings.lease_seconds:
            # Not renewed within a lease: another member may own these partitions
            # now, so fetch nothing until the next renewal says what is still ours.
            owned = []
        if not owned:
            return []
        self._rotation = (self._rotation + 1) % len(owned)
        owned = owned[self._rotation :] + owned[: self._rotation]
        now = time.time()
        retries = self._retry_due is not None and self._retry_due <= now
        result = await self._transport.reader.read(
            poll,
            self.group,
            owned,
            limit,
            now,
            retries,
            frozenset(self._retries_in_flight),
        )
        if retries:
            self._retry_due = result.retry_due
        return admit(result.retries, result.batches, self._owned, self._retries_in_flight)

    # -- settling ---------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if self._closed:
            ensure_open(True, f"subscription of group {self.group!r}")
        settle_in_log(deliveries, self._owned, self._positions, self._settle)
        if self._commit_timer is None and self._commit_task is None:
            self._schedule_commit()

    def _settle(self, d: Delivery) -> None:
        handle = d.handle
        if type(handle) is RetryHandle:
            key = (handle.cid, d.partition, d.offset)
            self._retries_in_flight.discard(key)
            self._retries_done.append(key)
        elif isinstance(handle, OwnedPartition):
            if self._owned.get((d.channel, d.partition)) is handle and handle.settle(d.offset):
                self._positions[(handle.cid, d.partition)] = handle.low
        else:
            raise ValueError(
                f"delivery {d.channel}[{d.partition}]@{d.offset} was not fetched from this "
                "SQLite subscription; settle a delivery on the subscription that fetched it"
            )

    async def nack(self, delivery: Delivery, delay: float) -> None:
        ensure_open(self._closed, f"subscription of group {self.group!r}")
        handle = delivery.handle
        due = time.time() + max(delay, 0.0)
        if type(handle) is RetryHandle:
            key = (handle.cid, delivery.partition)
        elif isinstance(handle, OwnedPartition):
            if self._owned.get((delivery.channel, delivery.partition)) is not handle:
                # Revoked: the partition's next owner delivers it again from the
                # committed position, so recording a retry would duplicate it.
                return
            key = (handle.cid, delivery.partition)
        else:
            self._settle(delivery)  # raises, naming the foreign delivery
            return
        await self._transport.writer.submit(
            functools.partial(
                _membership.schedule_retry,
                group=self.group,
                key=key,
                offset=delivery.offset,
                attempt=delivery.attempt + 1,
                due=due,
            )
        )
        if type(handle) is RetryHandle:
            self._retries_in_flight.discard((handle.cid, delivery.partition, delivery.offset))
        else:
            self._settle(delivery)
            self._schedule_commit()
        if self._retry_due is None or due < self._retry_due:
            self._retry_due = due
        self._transport.notify_local()

    async def dead_letter(self, delivery: Delivery, reason: DeadLetterReason) -> None:
        ensure_open(self._closed, f"subscription of group {self.group!r}")
        await self._transport.publish(
            dead_letter_channel(delivery.channel, self.group),
            [dead_letter_message(delivery, self.group, reason)],
        )
        self._settle(delivery)
        self._schedule_commit()

    def assignment(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._owned)

    # -- committing -------------------------------------------------------------

    def _schedule_commit(self) -> None:
        if not (self._positions or self._retries_done) or self._commit_timer is not None:
            return
        if self._commit_task is not None:
            return  # the running commit reschedules when it ends
        wait = self._last_commit + self._settings.commit_interval - time.monotonic()
        if wait <= 0:
            self._commit_task = asyncio.create_task(self._commit())
        else:
            self._commit_timer = asyncio.get_running_loop().call_later(wait, self._commit_now)

    def _commit_now(self) -> None:
        self._commit_timer = None
        if self._commit_task is None and not self._closed:
            self._commit_task = asyncio.create_task(self._commit())

    async def _commit(self) -> None:
        try:
            positions, self._positions = self._positions, {}
            done, self._retries_done = self._retries_done, []
            self._last_commit = time.monotonic()
            try:
                await self._transport.writer.submit(
                    functools.partial(
                        _membership.settle,
                        group=self.group,
                        positions=positions,
                        retries_done=done,
                    ),
                    durable=False,
                )
            except Exception:
                log.warning(
                    "committing positions of group %r failed; retrying", self.group, exc_info=True
                )
                self._restore(positions, done)
        finally:
            self._commit_task = None
        if not self._closed:
            self._schedule_commit()

    def _restore(
        self, positions: dict[PartitionKey, int], done: list[tuple[int, int, int]]
    ) -> None:
        for key, pos in positions.items():
            if self._positions.get(key, -1) < pos:
                self._positions[key] = pos
        self._retries_done.extend(done)

    # -- membership -------------------------------------------------------------

    async def _lease_loop(self) -> None:
        heartbeat = self._settings.heartbeat
        check = min(heartbeat, 0.1)
        next_renewal = time.monotonic() + heartbeat
        reader = self._transport.reader
        while not self._closed:
            await asyncio.sleep(check)
            if self._closed:
                break
            try:
                generation = await reader.read(_membership.read_generation, self.group)
                if generation != self._generation or time.monotonic() >= next_renewal:
                    waiting = await self._renew()
                    next_renewal = time.monotonic() + (check * 3 if waiting else heartbeat)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning(
                    "renewing the lease of %s in group %r failed; retrying",
                    self._member,
                    self.group,
                    exc_info=True,
                )

    async def _renew(self) -> bool:
        positions, self._positions = self._positions, {}
        before = {(o.cid, o.part) for o in self._owned.values()}
        started = time.monotonic()
        try:
            outcome = await self._transport.writer.submit(
                functools.partial(
                    _membership.renew,
                    group=self.group,
                    member=self._member,
                    channels=self._channel_ids,
                    lease=self._settings.lease_seconds,
                    owned=before,
                    positions=positions,
                ),
                durable=False,
            )
        except BaseException:
            self._restore(positions, [])
            raise
        if self._closed:
            return False
        self._renewed_at = started
        for name, part in list(self._owned):
            o = self._owned[(name, part)]
            if (o.cid, part) not in outcome.owned:
                del self._owned[(name, part)]
                self._retries_in_flight = {
                    r for r in self._retries_in_flight if (r[0], r[1]) != (o.cid, part)
                }
        for (cid, part), committed in outcome.acquired.items():
            name = self._names[cid]
            self._owned[(name, part)] = OwnedPartition(name, cid, part, committed)
        if outcome.retry_due is not None and (
            self._retry_due is None or outcome.retry_due < self._retry_due
        ):
            self._retry_due = outcome.retry_due
        self._generation = outcome.generation
        if outcome.acquired:
            self._transport.notify_local()
        return outcome.waiting

    # -- closing ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        for task in (self._lease_task, self._commit_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._lease_task = self._commit_task = None
        self._transport.forget_subscription(self)
        positions, self._positions = self._positions, {}
        done, self._retries_done = self._retries_done, []
        self._owned.clear()
        self._transport.notify_local()
        if self._transport.writer_open:
            await self._transport.writer.submit(
                functools.partial(
                    _leave_and_settle,
                    group=self.group,
                    member=self._member,
                    positions=positions,
                    done=done,
                ),
                durable=False,
            )


def _leave_and_settle(
    conn: sqlite3.Connection,
    *,
    group: str,
    member: str,
    positions: dict[PartitionKey, int],
    done: list[tuple[int, int, int]],
) -> None:
    _membership.settle(conn, group, positions, done)
    _membership.leave(conn, group=group, member=member)
