"""The partitioned log's SQL: channels, appends, reads and positions in time.

Appending is one statement: it takes the rows of the touched partitions with
``SELECT ... ORDER BY chan, part FOR UPDATE`` (always in that order, so concurrent
writers never deadlock), raises each partition's head, inserts the messages at the
offsets it freed, and calls ``pg_notify`` to wake the consumers: one notification
per transaction and channel, sent by the server at commit. The row locks are held
until commit, so the writers of a partition commit in offset order.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import msgspec
from psycopg import AsyncConnection

from nervus.transports.postgres._schema import qualify

encode_headers = msgspec.json.Encoder().encode

# (channel id, partition, key, headers as JSON text, body) of one message to append
Pending = tuple[int, int, str | None, str, bytes]
# (channel id, partition, offset, timestamp, key, headers, body) of one stored message
Stored = tuple[int, int, int, float, str | None, dict[str, str], bytes]


@lru_cache(maxsize=256)
def sql(template: str, schema: str) -> bytes:
    """``template`` for ``schema``, built once."""
    return qualify(template, schema)


_ENSURE_CHANNEL = """
WITH created AS (
    INSERT INTO {s}.channels (name, partitions) VALUES (%s, %s)
    ON CONFLICT (name) DO NOTHING RETURNING id, partitions
)
SELECT id, partitions FROM created
UNION ALL SELECT id, partitions FROM {s}.channels WHERE name = %s
"""
_ENSURE_PARTITIONS = """
INSERT INTO {s}.partitions (chan, part) SELECT %s, g FROM generate_series(0, %s - 1) AS g
ON CONFLICT (chan, part) DO NOTHING
"""


async def ensure_channel(
    conn: AsyncConnection[Any], schema: str, name: str, partitions: int
) -> tuple[int, int]:
    """Create ``name`` with ``partitions`` unless it exists; return (id, partition count)."""
    async with conn.transaction():
        cur = await conn.execute(sql(_ENSURE_CHANNEL, schema), (name, partitions, name))
        row = await cur.fetchone()
        if row is None:  # created by a transaction not yet visible: it committed by now
            cur = await conn.execute(sql(_ENSURE_CHANNEL, schema), (name, partitions, name))
            row = await cur.fetchone()
        assert row is not None
        cid, count = int(row[0]), int(row[1])
        await conn.execute(sql(_ENSURE_PARTITIONS, schema), (cid, count))
    return cid, count


_APPEND = """
WITH locked AS MATERIALIZED (
    SELECT p.chan, p.part FROM {s}.partitions AS p
    JOIN unnest(%s::integer[], %s::integer[]) AS t (chan, part) USING (chan, part)
    ORDER BY p.chan, p.part FOR UPDATE OF p
), m AS (
    SELECT * FROM unnest(%s::integer[], %s::integer[], %s::text[], %s::text[], %b::bytea[])
    WITH ORDINALITY AS m (chan, part, key, headers, body, i)
), counts AS (
    SELECT chan, part, count(*) AS n FROM m GROUP BY chan, part
), heads AS (
    UPDATE {s}.partitions AS p
    SET head = p.head + counts.n, last_ts = greatest(p.last_ts, clock_timestamp())
    FROM locked JOIN counts USING (chan, part)
    WHERE p.chan = locked.chan AND p.part = locked.part
    RETURNING p.chan, p.part, p.head - counts.n AS first, p.last_ts AS ts
), appended AS (
    INSERT INTO {s}.log (chan, part, off, ts, key, headers, body)
    SELECT m.chan, m.part,
           heads.first + row_number() OVER (PARTITION BY m.chan, m.part ORDER BY m.i) - 1,
           heads.ts, m.key, m.headers::jsonb, m.body
    FROM m JOIN heads USING (chan, part)
    RETURNING chan
)
SELECT pg_notify(%s, 'c:' || chan) FROM (SELECT DISTINCT chan FROM appended) AS c
"""


async def append(
    conn: AsyncConnection[Any], schema: str, notify_channel: str, messages: Sequence[Pending]
) -> None:
    """Append messages in order, each at the next offset of its partition, and notify
    the consumers of every channel written: one statement, so one round trip and
    (on an autocommit connection) one transaction.

    ``locked`` takes the partition rows in (channel, partition) order before the
    update can touch them: the update only reaches rows ``locked`` returned, and
    the primary key of ``log`` refuses any offset given twice.
    """
    chans = [m[0] for m in messages]
    parts = [m[1] for m in messages]
    touched = sorted(set(zip(chans, parts, strict=True)))
    await conn.execute(
        sql(_APPEND, schema),
        (
            [c for c, _ in touched],
            [p for _, p in touched],
            chans,
            parts,
            [m[2] for m in messages],
            [m[3] for m in messages],
            [m[4] for m in messages],
            notify_channel,
        ),
    )


_HEADS = """
SELECT chan, part, head FROM {s}.partitions
WHERE (chan, part) IN (SELECT * FROM unnest(%s::integer[], %s::integer[]))
"""


async def heads(
    conn: AsyncConnection[Any], schema: str, pairs: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], int]:
    """The next offset of each partition in ``pairs``."""
    cur = await conn.execute(sql(_HEADS, schema), ([c for c, _ in pairs], [p for _, p in pairs]))
    return {(int(c), int(p)): int(h) for c, p, h in await cur.fetchall()}


_READ = """
SELECT r.chan, r.part, l.off, extract(epoch FROM l.ts)::float8, l.key, l.headers, l.body
FROM unnest(%s::integer[], %s::integer[], %s::bigint[], %s::integer[])
     WITH ORDINALITY AS r (chan, part, start, n, i)
CROSS JOIN LATERAL (
    SELECT off, ts, key, headers, body FROM {s}.log
    WHERE chan = r.chan AND part = r.part AND off >= r.start ORDER BY off LIMIT r.n
) AS l
ORDER BY r.i, l.off
"""


async def read(
    conn: AsyncConnection[Any], schema: str, ranges: Sequence[tuple[int, int, int, int]]
) -> list[Stored]:
    """Messages of several partitions in one query: for each ``(channel id, partition,
    first offset, count)`` up to ``count`` messages from ``first offset``, in order."""
    cur = conn.cursor(binary=True)
    await cur.execute(
        sql(_READ, schema),
        (
            [r[0] for r in ranges],
            [r[1] for r in ranges],
            [r[2] for r in ranges],
            [r[3] for r in ranges],
        ),
    )
    return await cur.fetchall()


_HEAD = "SELECT head FROM {s}.partitions WHERE chan = %s AND part = %s"
_FIRST = "SELECT off FROM {s}.log WHERE chan = %s AND part = %s ORDER BY off LIMIT 1"
_TS_AT = "SELECT ts >= to_timestamp(%s) FROM {s}.log WHERE chan = %s AND part = %s AND off = %s"


async def head(conn: AsyncConnection[Any], schema: str, cid: int, part: int) -> int:
    cur = await conn.execute(sql(_HEAD, schema), (cid, part))
    row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def offset_at_time(
    conn: AsyncConnection[Any], schema: str, cid: int, part: int, when: float
) -> int:
    """The offset of the first message at or after ``when`` (the head if none), by
    bisection over the dense offsets between the first kept one and the head."""
    cur = await conn.execute(sql(_FIRST, schema), (cid, part))
    row = await cur.fetchone()
    high = await head(conn, schema, cid, part)
    if row is None:
        return high
    low = int(row[0])
    while low < high:
        mid = (low + high) // 2
        cur = await conn.execute(sql(_TS_AT, schema), (when, cid, part, mid))
        found = await cur.fetchone()
        if found is None or found[0]:
            high = mid
        else:
            low = mid + 1
    return low
