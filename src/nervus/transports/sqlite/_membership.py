"""Consumer groups on leases: membership, partition ownership, committed offsets, retries.

Each member renews a lease (``nervus_members.expires``) every heartbeat. On renewal
it removes members whose lease ran out (with their partitions), computes the same
deterministic target assignment every member computes from the live members, takes
the partitions targeted to it that are free or held by a dead member, and releases
the ones now targeted to another member (committing its settled positions first, in
the same transaction). Joins, departures and releases bump the group's
``generation`` so the other members notice within a short read and renew at once.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from collections.abc import Mapping

import msgspec

from nervus.transports._contract import Start
from nervus.transports.sqlite import _log

PartitionKey = tuple[int, int]  # (channel id, partition)


class LeaseOutcome(msgspec.Struct, gc=False):
    """What a renewal decided: partitions owned now, with the committed position of
    each newly acquired one, and the group's generation after the renewal."""

    owned: set[PartitionKey]
    acquired: dict[PartitionKey, int]
    generation: int
    waiting: bool
    retry_due: float | None


def target_owner(members: list[str], channel: str, partition: int) -> str:
    """The member a partition belongs to: spread round-robin from a per-channel shift,
    so one-partition channels do not all land on the first member."""
    shift = zlib.crc32(channel.encode())
    return members[(partition + shift) % len(members)]


def commit_positions(
    conn: sqlite3.Connection, group: str, positions: Mapping[PartitionKey, int]
) -> None:
    """Move committed positions forward (never back)."""
    if positions:
        conn.executemany(
            "INSERT INTO nervus_offsets (grp, chan, part, committed) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (grp, chan, part) DO UPDATE "
            "SET committed = max(committed, excluded.committed)",
            [(group, cid, part, pos) for (cid, part), pos in positions.items()],
        )


def renew(
    conn: sqlite3.Connection,
    *,
    group: str,
    member: str,
    channels: Mapping[str, tuple[int, int]],
    lease: float,
    owned: set[PartitionKey],
    positions: Mapping[PartitionKey, int],
) -> LeaseOutcome:
    now = time.time()
    bump = False
    listed = json.dumps(sorted(channels))
    updated = conn.execute(
        "UPDATE nervus_members SET expires = ?, channels = ? WHERE grp = ? AND member = ?",
        (now + lease, listed, group, member),
    ).rowcount
    if not updated:
        conn.execute(
            "INSERT INTO nervus_members (grp, member, channels, expires) VALUES (?, ?, ?, ?)",
            (group, member, listed, now + lease),
        )
        bump = True
    expired = [
        m
        for (m,) in conn.execute(
            "SELECT member FROM nervus_members WHERE grp = ? AND expires < ?", (group, now)
        )
    ]
    if expired:
        conn.executemany(
            "DELETE FROM nervus_members WHERE grp = ? AND member = ?", [(group, m) for m in expired]
        )
        conn.executemany(
            "DELETE FROM nervus_owners WHERE grp = ? AND member = ?", [(group, m) for m in expired]
        )
        bump = True
    live: list[tuple[str, set[str]]] = [
        (m, set(json.loads(chans)))
        for m, chans in conn.execute(
            "SELECT member, channels FROM nervus_members WHERE grp = ? ORDER BY member", (group,)
        )
    ]
    alive = {m for m, _ in live}
    owners: dict[PartitionKey, str] = {
        (cid, part): m
        for cid, part, m in conn.execute(
            "SELECT chan, part, member FROM nervus_owners WHERE grp = ?", (group,)
        )
    }
    commit_positions(conn, group, positions)
    now_owned: set[PartitionKey] = set()
    waiting = False
    for name, (cid, count) in channels.items():
        candidates = [m for m, chans in live if name in chans]
        for part in range(count):
            key = (cid, part)
            holder = owners.get(key)
            if target_owner(candidates, name, part) == member:
                if holder == member:
                    now_owned.add(key)
                elif holder is None or holder not in alive:
                    conn.execute(
                        "INSERT OR REPLACE INTO nervus_owners (grp, chan, part, member) "
                        "VALUES (?, ?, ?, ?)",
                        (group, cid, part, member),
                    )
                    now_owned.add(key)
                else:
                    waiting = True
            elif holder == member:
                conn.execute(
                    "DELETE FROM nervus_owners WHERE grp = ? AND chan = ? AND part = ?",
                    (group, cid, part),
                )
                bump = True
    acquired: dict[PartitionKey, int] = {}
    retry_due: float | None = None
    for cid, part in now_owned - owned:
        row = conn.execute(
            "SELECT committed FROM nervus_offsets WHERE grp = ? AND chan = ? AND part = ?",
            (group, cid, part),
        ).fetchone()
        acquired[(cid, part)] = 0 if row is None else int(row[0])
        (due,) = conn.execute(
            "SELECT min(due) FROM nervus_retries WHERE grp = ? AND chan = ? AND part = ?",
            (group, cid, part),
        ).fetchone()
        if due is not None and (retry_due is None or due < retry_due):
            retry_due = float(due)
    generation = _generation(conn, group, bump)
    return LeaseOutcome(now_owned, acquired, generation, waiting, retry_due)


def leave(conn: sqlite3.Connection, *, group: str, member: str) -> None:
    """Release every partition and leave the group (commit positions before)."""
    conn.execute("DELETE FROM nervus_owners WHERE grp = ? AND member = ?", (group, member))
    conn.execute("DELETE FROM nervus_members WHERE grp = ? AND member = ?", (group, member))
    _generation(conn, group, True)


def read_generation(conn: sqlite3.Connection, group: str) -> int:
    row = conn.execute("SELECT generation FROM nervus_groups WHERE grp = ?", (group,)).fetchone()
    return 0 if row is None else int(row[0])


def _generation(conn: sqlite3.Connection, group: str, bump: bool) -> int:
    if bump:
        conn.execute(
            "INSERT INTO nervus_groups (grp, generation) VALUES (?, 1) "
            "ON CONFLICT (grp) DO UPDATE SET generation = generation + 1",
            (group,),
        )
    return read_generation(conn, group)


def move_positions(
    conn: sqlite3.Connection, group: str, channels: Mapping[str, tuple[int, int]], start: Start
) -> None:
    """Set the group's positions for a replay (they may move backwards)."""
    rows: list[tuple[str, int, int, int]] = []
    for name, (cid, count) in channels.items():
        for part in range(count):
            if start.kind == "beginning":
                pos: int | None = 0
            elif start.kind == "end":
                pos = _log.head(conn, cid, part)
            elif start.kind == "offsets":
                pos = (start.offsets or {}).get(name, {}).get(part)
            elif start.kind == "time":
                pos = _log.offset_at_time(conn, cid, part, start.time or 0.0)
            else:
                pos = None
            if pos is not None:
                rows.append((group, cid, part, pos))
    conn.executemany(
        "INSERT OR REPLACE INTO nervus_offsets (grp, chan, part, committed) VALUES (?, ?, ?, ?)",
        rows,
    )


def schedule_retry(
    conn: sqlite3.Connection, group: str, key: PartitionKey, offset: int, attempt: int, due: float
) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO nervus_retries (grp, chan, part, off, attempt, due) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (group, key[0], key[1], offset, attempt, due),
    )


def settle(
    conn: sqlite3.Connection,
    group: str,
    positions: Mapping[PartitionKey, int],
    retries_done: list[tuple[int, int, int]],
) -> None:
    """Commit positions and forget retries that were settled."""
    commit_positions(conn, group, positions)
    if retries_done:
        conn.executemany(
            "DELETE FROM nervus_retries WHERE grp = ? AND chan = ? AND part = ? AND off = ?",
            [(group, cid, part, off) for cid, part, off in retries_done],
        )
