"""Consumer groups on leases kept in a JetStream key-value bucket.

A group's whole membership is one record (key ``group.<group>``): the live members
with the channels they read and when their lease ends, which member owns which
partition, and a ``generation`` bumped by joins, departures and releases. Every
change is a revision-checked update (compare and set), so concurrent members never
overwrite each other; a member that loses the race reads again and retries.

Each member renews every heartbeat and, on renewal, drops members whose lease ran
out (with their partitions), computes the same deterministic target assignment every
member computes from the live members, takes the partitions targeted to it that are
free or held by a dead member, and releases those now targeted to another member.
Members read the record every ``check_interval`` and renew at once when the
generation moved, so a join or a departure settles within a few reads; a member
killed without leaving is dropped once its lease runs out.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Mapping

import msgspec
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from nervus.transports.nats._names import group_key

Pair = tuple[str, int]  # (channel, partition)


class MemberRecord(msgspec.Struct):
    channels: list[str]
    expires: float


class GroupRecord(msgspec.Struct):
    """The stored membership of one group."""

    generation: int = 0
    members: dict[str, MemberRecord] = msgspec.field(default_factory=dict)
    owners: dict[str, dict[int, str]] = msgspec.field(default_factory=dict)


class LeaseOutcome(msgspec.Struct, gc=False):
    """What a renewal decided: the partitions owned now, whether some targeted to this
    member are still held by another (about to release them), the generation after."""

    owned: frozenset[Pair]
    waiting: bool
    generation: int


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(GroupRecord).decode


def target_owner(members: list[str], channel: str, partition: int) -> str:
    """The member a partition belongs to: spread round-robin from a per-channel shift,
    so one-partition channels do not all land on the first member."""
    shift = zlib.crc32(channel.encode())
    return members[(partition + shift) % len(members)]


def renew(
    record: GroupRecord,
    *,
    member: str,
    channels: Mapping[str, int],
    lease: float,
    now: float,
) -> LeaseOutcome:
    """Apply one renewal of ``member`` to ``record`` (in place)."""
    bump = member not in record.members
    record.members[member] = MemberRecord(sorted(channels), now + lease)
    expired = [m for m, r in record.members.items() if r.expires < now]
    for m in expired:
        del record.members[m]
        bump = True
    alive = sorted(record.members)
    owned: set[Pair] = set()
    waiting = False
    for name, count in channels.items():
        candidates = [m for m in alive if name in record.members[m].channels]
        owners = record.owners.setdefault(name, {})
        for part in range(count):
            holder = owners.get(part)
            if target_owner(candidates, name, part) == member:
                if holder == member:
                    owned.add((name, part))
                elif holder is None or holder not in record.members:
                    owners[part] = member
                    owned.add((name, part))
                else:
                    waiting = True
            elif holder == member:
                del owners[part]
                bump = True
    # partitions of channels nobody reads any more, held by the dead
    for name, owners in list(record.owners.items()):
        for part, holder in list(owners.items()):
            if holder not in record.members:
                del owners[part]
        if not owners:
            del record.owners[name]
    if bump:
        record.generation += 1
    return LeaseOutcome(frozenset(owned), waiting, record.generation)


def leave(record: GroupRecord, member: str) -> None:
    """Release every partition of ``member`` and remove it from ``record``."""
    record.members.pop(member, None)
    for name, owners in list(record.owners.items()):
        for part, holder in list(owners.items()):
            if holder == member:
                del owners[part]
        if not owners:
            del record.owners[name]
    record.generation += 1


class GroupStore:
    """Reads and updates one group's record in the bucket with compare-and-set."""

    def __init__(self, bucket: KeyValue, group: str) -> None:
        self._bucket = bucket
        self._key = group_key(group)

    async def read(self) -> tuple[GroupRecord, int]:
        """The record and its revision (0: no record yet)."""
        try:
            entry = await self._bucket.get(self._key)
        except (KeyNotFoundError, KeyDeletedError):
            return GroupRecord(), 0
        if not entry.value:
            return GroupRecord(), entry.revision or 0
        return _decode(entry.value), entry.revision or 0

    async def generation(self) -> int:
        record, _ = await self.read()
        return record.generation

    async def renew(
        self, *, member: str, channels: Mapping[str, int], lease: float
    ) -> LeaseOutcome:
        while True:
            record, revision = await self.read()
            outcome = renew(record, member=member, channels=channels, lease=lease, now=time.time())
            if await self._write(record, revision):
                return outcome

    async def leave(self, member: str) -> None:
        while True:
            record, revision = await self.read()
            if member not in record.members and not any(
                member in owners.values() for owners in record.owners.values()
            ):
                return
            leave(record, member)
            if await self._write(record, revision):
                return

    async def _write(self, record: GroupRecord, revision: int) -> bool:
        """Store ``record`` if the stored one is still at ``revision``; False if another
        member wrote first (read again and retry)."""
        data = _encode(record)
        try:
            if revision == 0:
                await self._bucket.create(self._key, data)
            else:
                await self._bucket.update(self._key, data, last=revision)
        except KeyWrongLastSequenceError:
            await asyncio.sleep(0)
            return False
        return True
