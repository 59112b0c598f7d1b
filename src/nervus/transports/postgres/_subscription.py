"""A member of a consumer group on the PostgreSQL log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from nervus.errors import TransportError, TransportUnavailable
from nervus.transports._contract import (
    DeadLetterReason,
    Delivery,
    Subscription,
    dead_letter_channel,
    dead_letter_message,
    ensure_open,
)
from nervus.transports._table_log import OwnedPartition, RetryHandle, admit, settle_in_log
from nervus.transports.postgres import _membership
from nervus.transports.postgres._fetch import poll
from nervus.transports.postgres._membership import PartitionKey

if TYPE_CHECKING:
    from nervus.transports.postgres._transport import PostgresTransport

log = logging.getLogger("nervus.transports.postgres")

_LONGEST_WAIT = 2.0  # seconds between two commit attempts while they fail


def _log_failure(exc: BaseException, message: str, *args: object) -> None:
    """A warning with the traceback, or only a debug line when the server is
    unreachable (the transport's ``Reachability`` logs that once per outage)."""
    if isinstance(exc, TransportUnavailable):
        log.debug(message + ": %s", *args, exc)
    else:
        log.warning(message, *args, exc_info=exc)


class PostgresSubscription(Subscription):
    """Owns partitions by lease, fetches from its committed positions, commits
    settled positions in batches (at most every ``commit_interval`` seconds).

    Renews its lease every heartbeat, and at once when another member of the group
    joins, leaves or releases partitions (notified through LISTEN/NOTIFY).
    """

    def __init__(
        self,
        transport: PostgresTransport,
        group: str,
        channels: Mapping[str, tuple[int, int]],
        member: str,
    ) -> None:
        self.group = group
        self.channels = tuple(channels)
        self._transport = transport
        self._settings = transport.settings
        self._schema = transport.settings.schema
        self._durable = transport.settings.durable_positions
        self._channel_ids = dict(channels)
        self._names = {cid: name for name, (cid, _) in channels.items()}
        self.channel_ids = frozenset(self._names)
        self._member = member
        self._owned: dict[tuple[str, int], OwnedPartition] = {}
        self._positions: dict[PartitionKey, int] = {}
        self._retries_done: list[tuple[int, int, int]] = []
        self._retries_in_flight: set[tuple[int, int, int]] = set()
        self._retries_committing: set[tuple[int, int, int]] = set()
        self._retry_due: float | None = None  # time.time() when a retry is due
        self._generation = -1
        self._group_changed = asyncio.Event()
        self._rotation = 0
        self._closed = False
        self._lease_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._commit_timer: asyncio.TimerHandle | None = None
        self._last_commit = 0.0
        self._commit_failures = 0
        self._renewed_at = time.monotonic()

    @property
    def member(self) -> str:
        """This member's id in the group (host, process and a random part)."""
        return self._member

    async def start(self) -> None:
        await self._renew()
        self._lease_task = asyncio.create_task(self._lease_loop())

    def group_changed(self, generation: float) -> None:
        """Another member changed the group (to ``generation``): renew soon."""
        if generation > self._generation:
            self._group_changed.set()

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
            reachability = self._transport.reachability
            if reachability.down_since is not None:
                raise TransportUnavailable(
                    f"PostgreSQL at {reachability.where} is unreachable ({reachability.error}); "
                    f"group {self.group!r} waits to renew its lease"
                )
            owned = []
        if not owned:
            return []
        self._rotation = (self._rotation + 1) % len(owned)
        owned = owned[self._rotation :] + owned[: self._rotation]
        retries = self._retry_due is not None and self._retry_due <= time.time()
        async with self._transport.reader.use() as conn:
            result = await poll(
                conn,
                self._schema,
                self.group,
                owned,
                limit,
                retries,
                self._retries_in_flight | self._retries_committing | set(self._retries_done),
            )
        if retries:
            self._retry_due = None if result.retry_in is None else time.time() + result.retry_in
        return admit(result.retries, result.batches, self._owned, self._retries_in_flight)

    # -- settling ---------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        ensure_open(self._closed, f"subscription of group {self.group!r}")
        settle_in_log(deliveries, self._owned, self._positions, self._settle)
        if self._commit_timer is None and self._commit_task is None:
            self._schedule_commit()

    def _settle(self, d: Delivery) -> None:
        handle = d.handle
        if type(handle) is RetryHandle:
            key = (handle.cid, d.partition, d.offset)
            if key in self._retries_in_flight:
                self._retries_in_flight.discard(key)
                self._retries_done.append(key)
        elif isinstance(handle, OwnedPartition):
            if self._owned.get((d.channel, d.partition)) is handle and handle.settle(d.offset):
                self._positions[(handle.cid, d.partition)] = handle.low
        else:
            raise ValueError(
                f"delivery {d.channel}[{d.partition}]@{d.offset} was not fetched from this "
                "PostgreSQL subscription; settle a delivery on the subscription that fetched it"
            )

    async def nack(self, delivery: Delivery, delay: float) -> None:
        ensure_open(self._closed, f"subscription of group {self.group!r}")
        handle = delivery.handle
        delay = max(float(delay), 0.0)
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
        async with self._transport.control.use() as conn:
            await _membership.schedule_retry(
                conn,
                self._schema,
                group=self.group,
                key=key,
                offset=delivery.offset,
                attempt=delivery.attempt + 1,
                delay=delay,
            )
        if type(handle) is RetryHandle:
            self._retries_in_flight.discard((handle.cid, delivery.partition, delivery.offset))
        else:
            self._settle(delivery)
            self._schedule_commit()
        due = time.time() + delay
        if self._retry_due is None or due < self._retry_due:
            self._retry_due = due
        self._transport.notify_change()

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
        interval = self._settings.commit_interval
        if self._commit_failures:  # the server is unreachable or refuses: back off
            interval = max(interval, min(0.1 * 2 ** (self._commit_failures - 1), _LONGEST_WAIT))
        wait = self._last_commit + interval - time.monotonic()
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
            self._retries_committing.update(done)
            self._last_commit = time.monotonic()
            try:
                async with self._transport.control.use() as conn:
                    await _membership.settle(
                        conn,
                        self._schema,
                        group=self.group,
                        positions=positions,
                        done=done,
                        durable=self._durable,
                    )
            except Exception as exc:
                self._commit_failures += 1
                _log_failure(exc, "committing positions of group %r failed; retrying", self.group)
                self._restore(positions, done)
            else:
                self._commit_failures = 0
            finally:
                self._retries_committing.difference_update(done)
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
        soon = min(heartbeat, 0.2)
        next_renewal = time.monotonic() + heartbeat
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(next_renewal - time.monotonic(), 0.0)):
                    await self._group_changed.wait()
            if self._closed:
                break
            self._group_changed.clear()
            try:
                waiting = await self._renew()
                next_renewal = time.monotonic() + (soon if waiting else heartbeat)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log_failure(
                    exc,
                    "renewing the lease of %s in group %r failed; retrying",
                    self._member,
                    self.group,
                )
                next_renewal = time.monotonic() + min(heartbeat, 1.0)

    async def _renew(self) -> bool:
        positions, self._positions = self._positions, {}
        before = {(o.cid, o.part) for o in self._owned.values()}
        started = time.monotonic()
        try:
            async with self._transport.control.use() as conn:
                outcome = await _membership.renew(
                    conn,
                    self._schema,
                    notify_channel=self._settings.notify_channel,
                    group=self.group,
                    member=self._member,
                    channels=self._channel_ids,
                    lease=self._settings.lease_seconds,
                    owned=before,
                    positions=positions,
                    durable=self._durable,
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
        if outcome.retry_in is not None:
            due = time.time() + outcome.retry_in
            if self._retry_due is None or due < self._retry_due:
                self._retry_due = due
        self._generation = max(self._generation, outcome.generation)
        if outcome.acquired:
            self._transport.notify_change()
        return outcome.waiting

    # -- closing ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        lease, self._lease_task = self._lease_task, None
        if lease is not None:
            lease.cancel()  # a renewal cut short rolls back; leaving below settles the group
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await lease
        commit = self._commit_task
        if commit is not None:
            with contextlib.suppress(Exception):
                await commit  # let a running commit finish rather than guess its outcome
        self._transport.forget_subscription(self)
        positions, self._positions = self._positions, {}
        done, self._retries_done = self._retries_done, []
        self._owned.clear()
        self._transport.notify_change()
        try:
            async with self._transport.control.use() as conn:
                await _membership.leave(
                    conn,
                    self._schema,
                    notify_channel=self._settings.notify_channel,
                    group=self.group,
                    member=self._member,
                    positions=positions,
                    done=done,
                    durable=self._durable,
                )
        except TransportError:
            # The server is gone: the lease runs out and the group moves on; what was
            # settled and not committed is delivered again (at least once).
            log.warning(
                "leaving group %r cleanly failed; its partitions move when the lease of %s ends",
                self.group,
                self._member,
                exc_info=True,
            )
