"""Consumer groups on leases: membership, partition ownership, committed offsets, retries.

Each member renews a lease (``members.expires``, on the server's clock, so members on
machines with skewed clocks agree) every heartbeat. A renewal first locks the
group's row, so the renewals of one group take turns. It then removes members whose
lease ran out (with their partitions), computes the same deterministic target
assignment every member computes from the live members, takes the partitions
targeted to it that are free or held by a dead member, and releases the ones now
targeted to another member (committing its settled positions first, in the same
transaction). Joins, departures and releases bump the group's ``generation`` and
notify it (``g:<generation>:<group>``), so the other members renew at once.

Every transaction that writes group rows takes the group row first, then offsets,
then owners and members, so they never deadlock.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import msgspec
from psycopg import AsyncConnection

from nervus.transports._contract import Start
from nervus.transports.postgres import _log
from nervus.transports.postgres._log import sql

PartitionKey = tuple[int, int]  # (channel id, partition)


class LeaseOutcome(msgspec.Struct, gc=False):
    """What a renewal decided: partitions owned now, with the committed position of
    each newly acquired one, the group's generation after the renewal, whether a
    partition targeted to this member is still held by another, and in how many
    seconds the first retry of an acquired partition is due."""

    owned: set[PartitionKey]
    acquired: dict[PartitionKey, int]
    generation: int
    waiting: bool
    retry_in: float | None


def target_owner(members: list[str], channel: str, partition: int) -> str:
    """The member a partition belongs to: spread round-robin from a per-channel shift,
    so one-partition channels do not all land on the first member."""
    shift = zlib.crc32(channel.encode())
    return members[(partition + shift) % len(members)]


_RELAXED = "SET LOCAL synchronous_commit = off"
_LOCK_GROUP = """
INSERT INTO {s}.groups AS g (grp, generation) VALUES (%s, 0)
ON CONFLICT (grp) DO UPDATE SET generation = g.generation RETURNING generation
"""
_BUMP = "UPDATE {s}.groups SET generation = generation + 1 WHERE grp = %s RETURNING generation"
_NOTIFY = "SELECT pg_notify(%s, 'g:' || %s || ':' || %s)"
_COMMIT = """
INSERT INTO {s}.offsets AS o (grp, chan, part, committed)
SELECT %s, * FROM unnest(%s::integer[], %s::integer[], %s::bigint[])
ON CONFLICT (grp, chan, part) DO UPDATE SET committed = greatest(o.committed, excluded.committed)
"""
_RETRIES_DONE = """
DELETE FROM {s}.retries
WHERE grp = %s AND (chan, part, off) IN (
    SELECT * FROM unnest(%s::integer[], %s::integer[], %s::bigint[]))
"""
_RENEW = """
UPDATE {s}.members SET expires = clock_timestamp() + make_interval(secs => %s), channels = %s
WHERE grp = %s AND member = %s
"""
_JOIN = """
INSERT INTO {s}.members (grp, member, channels, expires)
VALUES (%s, %s, %s, clock_timestamp() + make_interval(secs => %s))
"""
_EXPIRE = "DELETE FROM {s}.members WHERE grp = %s AND expires < clock_timestamp() RETURNING member"
_DROP_OWNERS = "DELETE FROM {s}.owners WHERE grp = %s AND member = ANY(%s)"
_LIVE = 'SELECT member, channels FROM {s}.members WHERE grp = %s ORDER BY member COLLATE "C"'
_OWNERS = "SELECT chan, part, member FROM {s}.owners WHERE grp = %s"
_TAKE = """
INSERT INTO {s}.owners (grp, chan, part, member)
SELECT %s, c, p, %s FROM unnest(%s::integer[], %s::integer[]) AS t (c, p)
ON CONFLICT (grp, chan, part) DO UPDATE SET member = excluded.member
"""
_RELEASE = """
DELETE FROM {s}.owners
WHERE grp = %s AND member = %s AND (chan, part) IN (
    SELECT * FROM unnest(%s::integer[], %s::integer[]))
"""
_POSITIONS = """
SELECT t.c, t.p, coalesce(o.committed, 0)
FROM unnest(%s::integer[], %s::integer[]) AS t (c, p)
LEFT JOIN {s}.offsets AS o ON o.grp = %s AND o.chan = t.c AND o.part = t.p
"""
_FIRST_RETRY = """
SELECT extract(epoch FROM min(due) - clock_timestamp())::float8 FROM {s}.retries
WHERE grp = %s AND (chan, part) IN (SELECT * FROM unnest(%s::integer[], %s::integer[]))
"""
_LEAVE_OWNERS = "DELETE FROM {s}.owners WHERE grp = %s AND member = %s"
_LEAVE = "DELETE FROM {s}.members WHERE grp = %s AND member = %s"
_GENERATION = "SELECT generation FROM {s}.groups WHERE grp = %s"


async def _lock_group(conn: AsyncConnection[Any], schema: str, group: str) -> int:
    cur = await conn.execute(sql(_LOCK_GROUP, schema), (group,))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _bump(conn: AsyncConnection[Any], schema: str, channel: str, group: str) -> int:
    cur = await conn.execute(sql(_BUMP, schema), (group,))
    row = await cur.fetchone()
    assert row is not None
    generation = int(row[0])
    await conn.execute(_NOTIFY, (channel, str(generation), group))
    return generation


async def commit_positions(
    conn: AsyncConnection[Any], schema: str, group: str, positions: Mapping[PartitionKey, int]
) -> None:
    """Move committed positions forward (never back), in key order."""
    if positions:
        keys = sorted(positions)
        await conn.execute(
            sql(_COMMIT, schema),
            (group, [c for c, _ in keys], [p for _, p in keys], [positions[k] for k in keys]),
        )


async def _forget_retries(
    conn: AsyncConnection[Any], schema: str, group: str, done: list[tuple[int, int, int]]
) -> None:
    if done:
        done = sorted(done)
        await conn.execute(
            sql(_RETRIES_DONE, schema),
            (group, [d[0] for d in done], [d[1] for d in done], [d[2] for d in done]),
        )


async def renew(
    conn: AsyncConnection[Any],
    schema: str,
    *,
    notify_channel: str,
    group: str,
    member: str,
    channels: Mapping[str, tuple[int, int]],
    lease: float,
    owned: set[PartitionKey],
    positions: Mapping[PartitionKey, int],
    durable: bool,
) -> LeaseOutcome:
    bump = False
    listed = sorted(channels)
    async with conn.transaction():
        if not durable:
            await conn.execute(_RELAXED)
        generation = await _lock_group(conn, schema, group)
        cur = await conn.execute(sql(_RENEW, schema), (lease, listed, group, member))
        if not cur.rowcount:
            await conn.execute(sql(_JOIN, schema), (group, member, listed, lease))
            bump = True
        cur = await conn.execute(sql(_EXPIRE, schema), (group,))
        expired = [str(m) for (m,) in await cur.fetchall()]
        if expired:
            await conn.execute(sql(_DROP_OWNERS, schema), (group, expired))
            bump = True
        cur = await conn.execute(sql(_LIVE, schema), (group,))
        live: list[tuple[str, set[str]]] = [(m, set(chans)) for m, chans in await cur.fetchall()]
        alive = {m for m, _ in live}
        cur = await conn.execute(sql(_OWNERS, schema), (group,))
        holders: dict[PartitionKey, str] = {(int(c), int(p)): m for c, p, m in await cur.fetchall()}
        await commit_positions(conn, schema, group, positions)
        now_owned: set[PartitionKey] = set()
        take: list[PartitionKey] = []
        release: list[PartitionKey] = []
        waiting = False
        for name, (cid, count) in channels.items():
            candidates = [m for m, chans in live if name in chans]
            for part in range(count):
                key = (cid, part)
                holder = holders.get(key)
                if target_owner(candidates, name, part) == member:
                    if holder == member:
                        now_owned.add(key)
                    elif holder is None or holder not in alive:
                        take.append(key)
                        now_owned.add(key)
                    else:
                        waiting = True
                elif holder == member:
                    release.append(key)
        if take:
            await conn.execute(
                sql(_TAKE, schema),
                (group, member, [c for c, _ in take], [p for _, p in take]),
            )
        if release:
            await conn.execute(
                sql(_RELEASE, schema),
                (group, member, [c for c, _ in release], [p for _, p in release]),
            )
            bump = True
        acquired: dict[PartitionKey, int] = {}
        retry_in: float | None = None
        new = sorted(now_owned - owned)
        if new:
            chans, parts = [c for c, _ in new], [p for _, p in new]
            cur = await conn.execute(sql(_POSITIONS, schema), (chans, parts, group))
            acquired = {(int(c), int(p)): int(o) for c, p, o in await cur.fetchall()}
            cur = await conn.execute(sql(_FIRST_RETRY, schema), (group, chans, parts))
            row = await cur.fetchone()
            if row is not None and row[0] is not None:
                retry_in = max(float(row[0]), 0.0)
        if bump:
            generation = await _bump(conn, schema, notify_channel, group)
    return LeaseOutcome(now_owned, acquired, generation, waiting, retry_in)


async def leave(
    conn: AsyncConnection[Any],
    schema: str,
    *,
    notify_channel: str,
    group: str,
    member: str,
    positions: Mapping[PartitionKey, int],
    done: list[tuple[int, int, int]],
    durable: bool,
) -> None:
    """Commit what was settled, release every partition and leave the group."""
    async with conn.transaction():
        if not durable:
            await conn.execute(_RELAXED)
        await _lock_group(conn, schema, group)
        await commit_positions(conn, schema, group, positions)
        await _forget_retries(conn, schema, group, done)
        await conn.execute(sql(_LEAVE_OWNERS, schema), (group, member))
        await conn.execute(sql(_LEAVE, schema), (group, member))
        await _bump(conn, schema, notify_channel, group)


async def settle(
    conn: AsyncConnection[Any],
    schema: str,
    *,
    group: str,
    positions: Mapping[PartitionKey, int],
    done: list[tuple[int, int, int]],
    durable: bool,
) -> None:
    """Commit positions and forget retries that were settled."""
    async with conn.transaction():
        if not durable:
            await conn.execute(_RELAXED)
        await commit_positions(conn, schema, group, positions)
        await _forget_retries(conn, schema, group, done)


async def read_generation(conn: AsyncConnection[Any], schema: str, group: str) -> int:
    cur = await conn.execute(sql(_GENERATION, schema), (group,))
    row = await cur.fetchone()
    return 0 if row is None else int(row[0])


_MOVE = """
INSERT INTO {s}.offsets (grp, chan, part, committed)
SELECT %s, * FROM unnest(%s::integer[], %s::integer[], %s::bigint[])
ON CONFLICT (grp, chan, part) DO UPDATE SET committed = excluded.committed
"""


async def move_positions(
    conn: AsyncConnection[Any],
    schema: str,
    group: str,
    channels: Mapping[str, tuple[int, int]],
    start: Start,
) -> None:
    """Set the group's positions for a replay (they may move backwards)."""
    rows: list[tuple[int, int, int]] = []
    async with conn.transaction():
        await _lock_group(conn, schema, group)
        for name, (cid, count) in channels.items():
            for part in range(count):
                if start.kind == "beginning":
                    pos: int | None = 0
                elif start.kind == "end":
                    pos = await _log.head(conn, schema, cid, part)
                elif start.kind == "offsets":
                    pos = (start.offsets or {}).get(name, {}).get(part)
                elif start.kind == "time":
                    pos = await _log.offset_at_time(conn, schema, cid, part, start.time or 0.0)
                else:
                    pos = None
                if pos is not None:
                    rows.append((cid, part, pos))
        if rows:
            await conn.execute(
                sql(_MOVE, schema),
                (group, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]),
            )


_RETRY = """
INSERT INTO {s}.retries (grp, chan, part, off, attempt, due)
VALUES (%s, %s, %s, %s, %s, clock_timestamp() + make_interval(secs => %s))
ON CONFLICT (grp, chan, part, off) DO UPDATE SET attempt = excluded.attempt, due = excluded.due
"""


async def schedule_retry(
    conn: AsyncConnection[Any],
    schema: str,
    *,
    group: str,
    key: PartitionKey,
    offset: int,
    attempt: int,
    delay: float,
) -> None:
    """Record (durably: the connection's default commit) that ``offset`` comes back as
    ``attempt`` no earlier than ``delay`` seconds from now on the server's clock."""
    await conn.execute(sql(_RETRY, schema), (group, key[0], key[1], offset, attempt, delay))
