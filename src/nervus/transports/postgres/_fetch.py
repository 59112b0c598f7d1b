"""One fetch pass: due retries first, then new messages of the owned partitions,
sharing ``max_messages`` fairly among the partitions that have some."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from psycopg import AsyncConnection

from nervus.transports._contract import Delivery
from nervus.transports._table_log import OwnedPartition, RetryHandle
from nervus.transports.postgres import _log


class PollResult:
    """Due retries, then per owned partition the deliveries read from its cursor;
    ``retry_in`` is how many seconds until the next retry is due (None: none is)."""

    __slots__ = ("batches", "retries", "retry_in")

    def __init__(
        self,
        retries: list[Delivery],
        batches: list[tuple[OwnedPartition, list[Delivery]]],
        retry_in: float | None,
    ) -> None:
        self.retries = retries
        self.batches = batches
        self.retry_in = retry_in


_DUE = """
SELECT r.chan, r.part, r.off, r.attempt, extract(epoch FROM l.ts)::float8, l.key, l.headers,
       l.body
FROM {s}.retries AS r
JOIN {s}.log AS l ON l.chan = r.chan AND l.part = r.part AND l.off = r.off
WHERE r.grp = %s AND r.due <= clock_timestamp()
  AND (r.chan, r.part) IN (SELECT * FROM unnest(%s::integer[], %s::integer[]))
ORDER BY r.due LIMIT %s
"""
_NEXT_DUE = """
SELECT extract(epoch FROM min(due) - clock_timestamp())::float8 FROM {s}.retries
WHERE grp = %s AND due > clock_timestamp()
  AND (chan, part) IN (SELECT * FROM unnest(%s::integer[], %s::integer[]))
"""


async def poll(
    conn: AsyncConnection[Any],
    schema: str,
    group: str,
    owned: list[OwnedPartition],
    limit: int,
    retries: bool,
    excluded: Collection[tuple[int, int, int]],
) -> PollResult:
    """Read up to ``limit`` deliveries; due retries only when ``retries`` (skipping
    ``excluded`` ones: handed out or settled but not yet committed)."""
    out: list[Delivery] = []
    retry_in: float | None = None
    chans = [o.cid for o in owned]
    parts = [o.part for o in owned]
    if retries:
        by_key = {(o.cid, o.part): o for o in owned}
        cur = conn.cursor(binary=True)
        await cur.execute(_log.sql(_DUE, schema), (group, chans, parts, limit + len(excluded)))
        full = False
        for cid, part, off, attempt, ts, key, headers, body in await cur.fetchall():
            o = by_key.get((cid, part))
            if o is None or (cid, part, off) in excluded:
                continue
            if len(out) >= limit:
                full = True
                break
            out.append(
                Delivery(
                    o.channel,
                    part,
                    off,
                    key,
                    _log.decode_headers(headers),
                    body,
                    attempt,
                    ts,
                    RetryHandle(cid),
                )
            )
        if full:
            retry_in = 0.0
        else:
            cur = await conn.execute(_log.sql(_NEXT_DUE, schema), (group, chans, parts))
            row = await cur.fetchone()
            retry_in = None if row is None or row[0] is None else max(float(row[0]), 0.0)
    batches: list[tuple[OwnedPartition, list[Delivery]]] = []
    remaining = limit - len(out)
    if remaining <= 0:
        return PollResult(out, batches, retry_in)
    found = await _log.heads(conn, schema, list(zip(chans, parts, strict=True)))
    ready = [(found.get((o.cid, o.part), 0) - o.cursor, o) for o in owned]
    ready = [(available, o) for available, o in ready if available > 0]
    if not ready:
        return PollResult(out, batches, retry_in)
    # Fair shares: partitions with fewer messages than an even share leave the
    # rest to the others.
    ready.sort(key=lambda r: r[0])
    ranges: list[tuple[int, int, int, int]] = []
    left = len(ready)
    by_range: list[OwnedPartition] = []
    for available, o in ready:
        if remaining <= 0:
            break
        share = min(available, -(-remaining // left))
        left -= 1
        remaining -= share
        ranges.append((o.cid, o.part, o.cursor, share))
        by_range.append(o)
    rows = await _log.read(conn, schema, ranges)
    decode = _log.decode_headers
    current = 0
    batch: list[Delivery] = []
    owner = owned[0]
    channel = owner.channel
    for i, off, ts, key, headers, body in rows:
        if i != current:
            current = i
            owner = by_range[i - 1]
            channel = owner.channel
            batch = []
            batches.append((owner, batch))
        batch.append(Delivery(channel, owner.part, off, key, decode(headers), body, 1, ts, owner))
    return PollResult(out, batches, retry_in)
