"""One fetch pass on the reading connection: due retries first, then new messages of the
owned partitions, sharing ``max_messages`` fairly among partitions."""

from __future__ import annotations

import sqlite3

from nervus.transports._contract import Delivery
from nervus.transports._table_log import OwnedPartition, RetryHandle
from nervus.transports.sqlite import _log


class PollResult:
    """Due retries, then per owned partition the deliveries read from its cursor."""

    __slots__ = ("batches", "retries", "retry_due")

    def __init__(
        self,
        retries: list[Delivery],
        batches: list[tuple[OwnedPartition, list[Delivery]]],
        retry_due: float | None,
    ) -> None:
        self.retries = retries
        self.batches = batches
        self.retry_due = retry_due


def poll(
    conn: sqlite3.Connection,
    group: str,
    owned: list[OwnedPartition],
    limit: int,
    now: float,
    retries: bool,
    in_flight: frozenset[tuple[int, int, int]],
) -> PollResult:
    decode = _log.headers_decoder.decode
    out: list[Delivery] = []
    batches: list[tuple[OwnedPartition, list[Delivery]]] = []
    retry_due: float | None = None
    conn.execute("BEGIN")
    try:
        if retries:
            retry_due = _due_retries(conn, group, owned, limit, now, in_flight, out)
        heads = _log.heads(conn, sorted({o.cid for o in owned}))
        ready = [o for o in owned if heads.get((o.cid, o.part), 0) > o.cursor]
        left = len(ready)
        taken = len(out)
        for o in ready:
            remaining = limit - taken
            if remaining <= 0:
                break
            share = -(-remaining // left)
            left -= 1
            channel, part = o.channel, o.part
            batch = [
                Delivery(channel, part, off, key, decode(headers), body, 1, ts, o)
                for off, ts, key, headers, body in _log.read(conn, o.cid, part, o.cursor, share)
            ]
            if batch:
                batches.append((o, batch))
                taken += len(batch)
    finally:
        conn.execute("COMMIT")
    return PollResult(out, batches, retry_due)


def _due_retries(
    conn: sqlite3.Connection,
    group: str,
    owned: list[OwnedPartition],
    limit: int,
    now: float,
    in_flight: frozenset[tuple[int, int, int]],
    out: list[Delivery],
) -> float | None:
    """Append due retries of owned partitions to ``out``; return when the next is due."""
    by_key = {(o.cid, o.part): o for o in owned}
    rows = conn.execute(
        "SELECT r.chan, r.part, r.off, r.attempt, l.ts, l.key, l.headers, l.body "
        "FROM nervus_retries AS r JOIN nervus_log AS l "
        "ON l.chan = r.chan AND l.part = r.part AND l.off = r.off "
        "WHERE r.grp = ? AND r.due <= ? ORDER BY r.due LIMIT ?",
        (group, now, limit + len(in_flight)),
    ).fetchall()
    decode = _log.headers_decoder.decode
    full = False
    for cid, part, off, attempt, ts, key, headers, body in rows:
        o = by_key.get((cid, part))
        if o is None or (cid, part, off) in in_flight:
            continue
        if len(out) >= limit:
            full = True
            break
        out.append(
            Delivery(
                o.channel, part, off, key, decode(headers), body, attempt, ts, RetryHandle(cid)
            )
        )
    if full:
        return now
    (due,) = conn.execute(
        "SELECT min(due) FROM nervus_retries WHERE grp = ? AND due > ?", (group, now)
    ).fetchone()
    return None if due is None else float(due)
