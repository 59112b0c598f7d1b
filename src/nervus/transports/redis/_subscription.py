"""A member of a consumer group on Redis Streams.

Ownership
    Redis hands the entries of one stream to whichever consumer of a group reads
    next, while the contract gives each partition one member at a time. Members
    therefore hold partitions by lease, in the group's keys (see ``_layout``), with
    the sqlite transport's algorithm run atomically by the ``RENEW`` script: each
    member renews its lease every heartbeat; a renewal drops members whose lease
    ran out (server time), computes the target assignment every member computes
    alike from the live members, takes the partitions targeted to it that are free
    or held by a dead member, and releases those now targeted to another member.
    Joins, departures and releases bump the group's generation; members read it
    every 0.1 s at most and renew at once when it moved.

Reading
    An owned partition is read with ``XREADGROUP ... >``; when nothing else is
    ready the read blocks on the server up to ``block_seconds``. A renewal that
    gives partitions away waits for the read in progress, so no entry lands in the
    pending list of a member that no longer owns its partition. A read asks each
    partition for an even share of ``max_messages``, or for more while all the
    partitions together stay within ``max_in_flight``; what a fetch cannot return
    waits in the partition's buffer (bounded by about ``max_in_flight``) and is
    handed out first by the next fetch, so ``fetch`` never returns more than asked.

Taking over
    A newly owned partition first claims, with ``XAUTOCLAIM``, every entry of the
    group's pending list (read by an earlier owner and never acknowledged) and
    delivers them again in id order, with the attempt Redis counted (its delivery
    count); then it reads new entries. The lease is the claim's timeout: entries
    are claimed once the earlier owner released the partition or its lease ran
    out, whatever their idle time. Consumers left with nothing pending are then
    deleted from the stream's group.

Settling
    ``ack`` is ``XACK``, sent in batches (``commit_interval``). Redis acknowledges
    each entry, so any settling order is committed as is: the pending list holds
    exactly the unsettled entries, no contiguous position is needed. ``nack``
    adds ``ID|ATTEMPT`` to the partition's retry set scored by the due time and
    acknowledges the entry, in one script; the partition's owner reads due
    retries before new entries and removes them when they are settled.
    ``dead_letter`` publishes the dead-letter copy, then acknowledges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError, ResponseError

from nervus.transports._contract import (
    DeadLetterReason,
    Delivery,
    Subscription,
    dead_letter_channel,
    dead_letter_message,
    ensure_open,
)
from nervus.transports.redis._client import CONNECTION_ERRORS, Connection
from nervus.transports.redis._layout import delivery_of, escape

if TYPE_CHECKING:
    from nervus.transports.redis._transport import RedisTransport

log = logging.getLogger("nervus.transports.redis")

GENERATION_CHECK = 0.1
# Acknowledgements that could not be sent are retried after this, doubling up to the
# longest, while the server is unreachable.
COMMIT_RETRY_FIRST = 0.05
COMMIT_RETRY_LONGEST = 1.0


class OwnedPartition:
    """A partition this member owns, with what is pending on it; a new object per
    ownership, so a delivery from an earlier ownership is recognised."""

    __slots__ = (
        "buffer",
        "channel",
        "claim_from",
        "in_flight",
        "partition",
        "retries",
        "stream",
        "stream_name",
    )

    def __init__(self, channel: str, partition: int, stream: str, retries: str) -> None:
        self.channel = channel
        self.partition = partition
        self.stream = stream
        self.stream_name = stream.encode()
        self.retries = retries
        self.claim_from: str | None = "0-0"  # where the XAUTOCLAIM sweep goes on; None: done
        self.in_flight: set[bytes] = set()
        self.buffer: deque[Delivery] = deque()


class EntryHandle:
    """The ``handle`` of a delivery read from a stream."""

    __slots__ = ("entry_id", "owner")

    def __init__(self, owner: OwnedPartition, entry_id: bytes) -> None:
        self.owner = owner
        self.entry_id = entry_id


class RetryHandle:
    """The ``handle`` of a delivery read from a retry set (``member`` is ``ID|ATTEMPT``)."""

    __slots__ = ("entry_id", "member", "owner")

    def __init__(self, owner: OwnedPartition, member: bytes, entry_id: bytes) -> None:
        self.owner = owner
        self.member = member
        self.entry_id = entry_id


class RedisSubscription(Subscription):
    """Owns partitions by lease, reads them through the Redis consumer group, sends
    acknowledgements in batches (at most every ``commit_interval`` seconds)."""

    def __init__(
        self,
        transport: RedisTransport,
        connection: Connection,
        group: str,
        channels: Mapping[str, int],
        member: str,
        max_in_flight: int,
    ) -> None:
        self.group = group
        self.channels = tuple(channels)
        self._transport = transport
        self._connection = connection
        self._client = connection.client
        self._settings = transport.settings
        self._keys = transport.keys
        self._counts = dict(channels)
        self._names = list(channels)
        self._group_keys = transport.keys.group(group)
        self._channel_spec = json.dumps(
            [[escape(n), c, zlib.crc32(n.encode())] for n, c in channels.items()]
        )
        self._channel_list = json.dumps([escape(n) for n in channels])
        self._member = member
        self._max_in_flight = max_in_flight
        self._owned: dict[tuple[str, int], OwnedPartition] = {}
        self._by_stream: dict[bytes, OwnedPartition] = {}
        self._retries_in_flight: set[tuple[str, bytes]] = set()
        self._retry_due: float | None = None
        self._acks: dict[str, list[bytes]] = {}
        self._retries_done: dict[str, list[bytes]] = {}
        self._generation = -1
        self._rotation = 0
        self._closed = False
        self._read_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._lease_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._commit_timer: asyncio.TimerHandle | None = None
        self._last_commit = 0.0
        self._commit_failures = 0
        self._renewed_at = time.monotonic()

    @property
    def member(self) -> str:
        """This member's id in the group and its Redis consumer name."""
        return self._member

    async def start(self) -> None:
        try:
            await self._renew()
        except RedisError as exc:
            raise self._connection.failed(exc, f"joining group {self.group!r}") from exc
        self._lease_task = asyncio.create_task(self._lease_loop())

    def _what(self) -> str:
        return f"subscription of group {self.group!r}"

    # -- fetching ---------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        ensure_open(self._closed, self._what())
        if max_messages <= 0:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                try:
                    out = await self._poll(max_messages, deadline)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc) or self._closed:
                        raise
                    await self._recreate_group(exc)
                    out = []
            except RedisError as exc:
                if self._closed:
                    return []
                raise self._connection.failed(exc, f"fetching for group {self.group!r}") from exc
            if out or self._closed or time.monotonic() >= deadline:
                return out

    async def _recreate_group(self, missing: ResponseError) -> None:
        """Create the group again where it is missing: the server lost it (a restart
        without persistence) or someone deleted it. It reads those streams from their
        beginning, so what was published since is not missed. The channels' partition
        counts are written again too, should the server have lost them."""
        pipe = self._client.pipeline(transaction=False)
        for name, count in self._counts.items():
            pipe.set(self._keys.channel(name), count, nx=True)
        streams = [
            self._keys.stream(name, p) for name, count in self._counts.items() for p in range(count)
        ]
        for stream in streams:
            pipe.xgroup_create(stream, self.group, id="0", mkstream=True)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        created = 0
        for result in results[len(self._counts) :]:
            if not isinstance(result, Exception):
                created += 1
            elif not (isinstance(result, ResponseError) and "BUSYGROUP" in str(result)):
                raise result
        for result in results[: len(self._counts)]:
            if isinstance(result, Exception):
                raise result
        log.warning(
            "group %r was missing on Redis at %s (%s): the server restarted without "
            "persistence or the group was deleted; created it again on %d of %d streams, "
            "reading them from their beginning",
            self.group,
            self._connection.where,
            missing,
            created,
            len(streams),
        )

    async def _poll(self, limit: int, deadline: float) -> list[Delivery]:
        settings = self._settings
        lease_left = self._renewed_at + settings.lease_seconds - time.monotonic()
        owned = list(self._owned.values())
        if not owned or lease_left <= 0:
            # Nothing owned, or not renewed within a lease (another member may own
            # these partitions now): wait for the next renewal.
            await self._wait_for_change(min(deadline - time.monotonic(), settings.block_seconds))
            return []
        self._rotation = (self._rotation + 1) % len(owned)
        owned = owned[self._rotation :] + owned[: self._rotation]
        out: list[Delivery] = []
        for o in owned:
            buffer = o.buffer
            while buffer and len(out) < limit:
                out.append(buffer.popleft())
        if len(out) >= limit:
            return out
        if self._retry_due is not None and self._retry_due <= time.time():
            await self._read_retries(owned, limit, out)
            if len(out) >= limit:
                return out
        claiming = [o for o in owned if o.claim_from is not None]
        if claiming:
            await self._claim(claiming, limit, out)
            if len(out) >= limit:
                return out
        reading = [o for o in owned if o.claim_from is None]
        block = 0.0
        if not out and not claiming:
            block = min(deadline - time.monotonic(), settings.block_seconds, lease_left / 2)
            if self._retry_due is not None:
                block = min(block, self._retry_due - time.time())
        if reading:
            await self._read_new(reading, limit, block, out)
        return out

    async def _wait_for_change(self, longest: float) -> None:
        if longest <= 0 or self._closed:
            return
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(longest):
                await self._changed.wait()

    async def _read_new(
        self, reading: list[OwnedPartition], limit: int, block: float, out: list[Delivery]
    ) -> None:
        """New entries of ``reading``, past ``limit`` into the partitions' buffers."""
        room = limit - len(out)
        # an even share of what was asked, or more while the prefetch stays within
        # max_in_flight: a busy partition need not wait for idle ones
        count = max(-(-room // len(reading)), min(room, self._max_in_flight // len(reading)))
        block_ms = int(block * 1000)
        async with self._read_lock:
            reading = [o for o in reading if self._owned.get((o.channel, o.partition)) is o]
            if self._closed or not reading:
                return
            try:
                response: Any = await self._client.xreadgroup(
                    self.group,
                    self._member,
                    {o.stream: ">" for o in reading},
                    count=count,
                    block=block_ms if block_ms > 0 else None,
                )
            except BaseException:
                # The read may have happened with its answer lost: entries in this
                # member's pending list that nobody saw. Sweep them up again.
                for o in reading:
                    o.claim_from = "0-0"
                raise
            by_stream = self._by_stream
            for name, entries in response or ():
                o = by_stream[name]
                channel, partition, in_flight, buffer = (
                    o.channel,
                    o.partition,
                    o.in_flight,
                    o.buffer,
                )
                for entry_id, fields in entries:
                    d = delivery_of(
                        channel, partition, entry_id, fields, 1, EntryHandle(o, entry_id)
                    )
                    in_flight.add(entry_id)
                    if len(out) < limit:
                        out.append(d)
                    else:
                        buffer.append(d)

    async def _claim(self, claiming: list[OwnedPartition], limit: int, out: list[Delivery]) -> None:
        """Go on with the XAUTOCLAIM sweep of newly owned partitions."""
        share = -(-(limit - len(out)) // len(claiming))
        finished: list[OwnedPartition] = []
        async with self._read_lock:
            claiming = [
                o
                for o in claiming
                if self._owned.get((o.channel, o.partition)) is o and o.claim_from is not None
            ]
            if self._closed or not claiming:
                return
            pipe = self._client.pipeline(transaction=False)
            for o in claiming:
                start = o.claim_from or "0-0"
                pipe.xautoclaim(o.stream, self.group, self._member, 0, start, count=share)
                pipe.xpending_range(
                    o.stream,
                    self.group,
                    start,
                    "+",
                    share + len(o.in_flight),
                    consumername=self._member,
                )
            results: list[Any] = await pipe.execute()
            for i, o in enumerate(claiming):
                cursor, entries = results[2 * i][0], results[2 * i][1]
                delivered = {p["message_id"]: int(p["times_delivered"]) for p in results[2 * i + 1]}
                for entry_id, fields in entries:
                    if entry_id is None or fields is None or entry_id in o.in_flight:
                        continue
                    d = delivery_of(
                        o.channel,
                        o.partition,
                        entry_id,
                        fields,
                        delivered.get(entry_id, 2),
                        EntryHandle(o, entry_id),
                    )
                    o.in_flight.add(entry_id)
                    if len(out) < limit:
                        out.append(d)
                    else:
                        o.buffer.append(d)
                if cursor in (b"0-0", "0-0"):
                    o.claim_from = None
                    finished.append(o)
                else:
                    o.claim_from = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if finished:
            try:
                await self._connection.prune(
                    keys=[o.stream for o in finished], args=[self.group, self._member, ""]
                )
            except RedisError:
                log.warning("removing idle consumers of group %r failed", self.group, exc_info=True)

    async def _read_retries(
        self, owned: list[OwnedPartition], limit: int, out: list[Delivery]
    ) -> None:
        """Due retries of the owned partitions; sets when the next one is due."""
        now = time.time()
        now_ms = int(now * 1000)
        room = limit - len(out)
        held: dict[str, int] = {}
        for key, _ in self._retries_in_flight:
            held[key] = held.get(key, 0) + 1
        pipe = self._client.pipeline(transaction=False)
        for o in owned:
            pipe.zrangebyscore(
                o.retries, "-inf", now_ms, start=0, num=room + held.get(o.retries, 0)
            )
        for o in owned:
            pipe.zrangebyscore(o.retries, f"({now_ms}", "+inf", start=0, num=1, withscores=True)
        results: list[Any] = await pipe.execute()
        chosen: list[tuple[OwnedPartition, bytes]] = []
        full = False
        for o, members in zip(owned, results[: len(owned)], strict=True):
            for m in members:
                if (o.retries, m) in self._retries_in_flight:
                    continue
                if len(chosen) >= room:
                    full = True
                    break
                chosen.append((o, m))
        later = [float(r[0][1]) / 1000 for r in results[len(owned) :] if r]
        self._retry_due = now if full else (min(later) if later else None)
        if not chosen:
            return
        pipe = self._client.pipeline(transaction=False)
        for o, m in chosen:
            entry_id = m.partition(b"|")[0]
            pipe.xrange(o.stream, min=entry_id, max=entry_id)
        found: list[Any] = await pipe.execute()
        gone: list[tuple[OwnedPartition, bytes]] = []
        for (o, m), entries in zip(chosen, found, strict=True):
            entry_id, _, attempt = m.partition(b"|")
            if not entries:
                gone.append((o, m))
                continue
            _, fields = entries[0]
            out.append(
                delivery_of(
                    o.channel,
                    o.partition,
                    entry_id,
                    fields,
                    int(attempt),
                    RetryHandle(o, m, entry_id),
                )
            )
            self._retries_in_flight.add((o.retries, m))
        if gone:
            log.warning(
                "dropping %d retries of group %r whose entries were trimmed from their streams",
                len(gone),
                self.group,
            )
            pipe = self._client.pipeline(transaction=False)
            for o, m in gone:
                pipe.zrem(o.retries, m)
            await pipe.execute()

    # -- settling ---------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if self._closed:
            ensure_open(True, self._what())
        acks = self._acks
        for d in deliveries:
            handle = d.handle
            if type(handle) is EntryHandle:
                owner = handle.owner
                owner.in_flight.discard(handle.entry_id)
                ids = acks.get(owner.stream)
                if ids is None:
                    acks[owner.stream] = [handle.entry_id]
                else:
                    ids.append(handle.entry_id)
            else:
                self._settle(d)
        if self._commit_timer is None and self._commit_task is None:
            self._schedule_commit()

    def _settle(self, d: Delivery) -> None:
        handle = d.handle
        if type(handle) is EntryHandle:
            handle.owner.in_flight.discard(handle.entry_id)
            self._acks.setdefault(handle.owner.stream, []).append(handle.entry_id)
        elif type(handle) is RetryHandle:
            self._retries_in_flight.discard((handle.owner.retries, handle.member))
            self._retries_done.setdefault(handle.owner.retries, []).append(handle.member)
        else:
            raise ValueError(
                f"delivery {d.channel}[{d.partition}]@{d.offset} was not fetched from this "
                "Redis subscription; settle a delivery on the subscription that fetched it"
            )

    async def nack(self, delivery: Delivery, delay: float) -> None:
        ensure_open(self._closed, self._what())
        handle = delivery.handle
        due = time.time() + max(delay, 0.0)
        if type(handle) is EntryHandle:
            owner = handle.owner
            if self._owned.get((delivery.channel, delivery.partition)) is not owner:
                # Revoked: the partition's next owner claims the entry and delivers it
                # again, so recording a retry would duplicate it.
                owner.in_flight.discard(handle.entry_id)
                return
            settles, replaces = handle.entry_id, b""
        elif type(handle) is RetryHandle:
            owner = handle.owner
            settles, replaces = b"", handle.member
        else:
            self._settle(delivery)  # raises, naming the foreign delivery
            return
        member = handle.entry_id + b"|" + str(delivery.attempt + 1).encode()
        pipe = self._client.pipeline(transaction=False)
        await self._connection.nack(
            keys=[owner.retries, owner.stream],
            args=[self.group, math.ceil(due * 1000), member, settles, replaces],
            client=pipe,
        )
        self._transport.add_durability_wait(pipe)
        what = f"nacking {delivery.channel}[{delivery.partition}]@{delivery.offset}"
        try:
            results: list[Any] = await pipe.execute()
        except RedisError as exc:
            raise self._connection.failed(exc, what, channel=delivery.channel) from exc
        if len(results) > 1:
            self._transport.check_durability_wait(results[-1], what, delivery.channel)
        if type(handle) is RetryHandle:
            self._retries_in_flight.discard((owner.retries, handle.member))
        else:
            owner.in_flight.discard(handle.entry_id)
        if self._retry_due is None or due < self._retry_due:
            self._retry_due = due

    async def dead_letter(self, delivery: Delivery, reason: DeadLetterReason) -> None:
        ensure_open(self._closed, self._what())
        if not isinstance(delivery.handle, EntryHandle | RetryHandle):
            self._settle(delivery)  # raises, naming the foreign delivery
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
        if not (self._acks or self._retries_done) or self._commit_timer is not None:
            return
        if self._commit_task is not None or self._closed:
            return  # the running commit reschedules when it ends; close flushes
        interval = self._settings.commit_interval
        if self._commit_failures:
            backoff = COMMIT_RETRY_FIRST * 2 ** min(self._commit_failures - 1, 10)
            interval = max(interval, min(backoff, COMMIT_RETRY_LONGEST))
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
            try:
                await self._send_settled()
                self._commit_failures = 0
            except CONNECTION_ERRORS as exc:
                # kept and sent again with backoff; the outage is logged once
                self._commit_failures += 1
                self._connection.lost(exc)
            except RedisError:
                self._commit_failures += 1
                log.warning(
                    "acknowledging deliveries of group %r failed; retrying",
                    self.group,
                    exc_info=True,
                )
        finally:
            self._commit_task = None
        if not self._closed:
            self._schedule_commit()

    async def _send_settled(self) -> None:
        """XACK settled entries and remove settled retries; on failure they are kept."""
        acks, self._acks = self._acks, {}
        done, self._retries_done = self._retries_done, {}
        self._last_commit = time.monotonic()
        if not (acks or done):
            return
        pipe = self._client.pipeline(transaction=False)
        for stream, ids in acks.items():
            pipe.xack(stream, self.group, *ids)
        for key, members in done.items():
            pipe.zrem(key, *members)
        try:
            await pipe.execute()
        except BaseException:
            for stream, ids in acks.items():
                self._acks.setdefault(stream, []).extend(ids)
            for key, members in done.items():
                self._retries_done.setdefault(key, []).extend(members)
            raise

    async def _flush(self) -> None:
        """Send every settlement made so far, now."""
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        task = self._commit_task
        if task is not None:
            await asyncio.shield(task)
        await self._send_settled()

    # -- membership -------------------------------------------------------------

    async def _lease_loop(self) -> None:
        heartbeat = self._settings.heartbeat
        check = min(heartbeat, GENERATION_CHECK)
        next_renewal = time.monotonic() + heartbeat
        generation_key = self._group_keys[3]
        while not self._closed:
            await asyncio.sleep(check)
            if self._closed:
                break
            try:
                raw = await self._client.get(generation_key)
                generation = int(raw or 0)
                if generation != self._generation or time.monotonic() >= next_renewal:
                    waiting = await self._renew()
                    next_renewal = time.monotonic() + (check * 3 if waiting else heartbeat)
                self._connection.reached()
            except asyncio.CancelledError:
                raise
            except CONNECTION_ERRORS as exc:
                # retried every check; the outage is logged once, and fetch waits for
                # a renewal once the lease ran out
                self._connection.lost(exc)
            except Exception:
                log.warning(
                    "renewing the lease of %s in group %r failed; retrying",
                    self._member,
                    self.group,
                    exc_info=True,
                )

    async def _renew(self) -> bool:
        # Acknowledge what was settled first, so the next owner of a partition given
        # away does not deliver it again.
        await self._flush()
        async with self._read_lock:
            if self._closed:
                return False
            started = time.monotonic()
            result: list[Any] = await self._connection.renew(
                keys=self._group_keys,
                args=[
                    self._member,
                    int(self._settings.lease_seconds * 1000),
                    self._channel_spec,
                    self._channel_list,
                ],
            )
            flat, waiting, generation = result[0], int(result[1]), int(result[2])
            now_owned = {
                (self._names[int(flat[i])], int(flat[i + 1])) for i in range(0, len(flat), 2)
            }
            for pair in list(self._owned):
                if pair not in now_owned:
                    o = self._owned.pop(pair)
                    self._by_stream.pop(o.stream_name, None)
                    o.buffer.clear()
                    self._retries_in_flight = {
                        r for r in self._retries_in_flight if r[0] != o.retries
                    }
            acquired: list[OwnedPartition] = []
            for channel, partition in sorted(now_owned - set(self._owned)):
                o = OwnedPartition(
                    channel,
                    partition,
                    self._keys.stream(channel, partition),
                    self._keys.retries(self.group, channel, partition),
                )
                self._owned[(channel, partition)] = o
                self._by_stream[o.stream_name] = o
                acquired.append(o)
            self._renewed_at = started
            self._generation = generation
        if acquired:
            await self._learn_retries(acquired)
            self._changed.set()
        return bool(waiting)

    async def _learn_retries(self, acquired: list[OwnedPartition]) -> None:
        """Note when the first retry of newly owned partitions is due."""
        pipe = self._client.pipeline(transaction=False)
        for o in acquired:
            pipe.zrange(o.retries, 0, 0, withscores=True)
        results: list[Any] = await pipe.execute()
        for first in results:
            if first:
                due = float(first[0][1]) / 1000
                if self._retry_due is None or due < self._retry_due:
                    self._retry_due = due

    # -- closing ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        task = self._lease_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._lease_task = None
        self._transport.forget_subscription(self)
        self._changed.set()
        streams = [o.stream for o in self._owned.values()]
        try:
            async with self._read_lock:  # a read in progress ends first
                await self._flush()
                if streams:
                    await self._connection.prune(keys=streams, args=[self.group, "", self._member])
                await self._connection.leave(keys=self._group_keys, args=[self._member])
        except RedisError:
            log.warning(
                "leaving group %r cleanly failed; its partitions move when the lease of %s "
                "runs out",
                self.group,
                self._member,
                exc_info=True,
            )
        finally:
            self._owned.clear()
            self._by_stream.clear()
