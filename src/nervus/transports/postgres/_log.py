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
from zlib import crc32

import msgspec
from psycopg import AsyncConnection

from nervus.transports._contract import OutgoingMessage
from nervus.transports.postgres._arrays import bytea_array, int4_array, text_array
from nervus.transports.postgres._schema import qualify

encode_headers = msgspec.json.Encoder().encode

decode_headers = msgspec.json.Decoder().decode

# (number of the range read, offset, timestamp, key, headers as JSON, body) of a message read
Stored = tuple[int, int, float, str | None, bytes, bytes]


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
    SELECT p.chan, p.part, t.n FROM {s}.partitions AS p
    JOIN unnest(%b::integer[], %b::integer[], %b::integer[]) AS t (chan, part, n)
    USING (chan, part)
    ORDER BY p.chan, p.part FOR UPDATE OF p
), heads AS (
    UPDATE {s}.partitions AS p
    SET head = p.head + locked.n, last_ts = greatest(p.last_ts, clock_timestamp())
    FROM locked
    WHERE p.chan = locked.chan AND p.part = locked.part
    RETURNING p.chan, p.part, p.head - locked.n AS first, p.last_ts AS ts
), appended AS (
    INSERT INTO {s}.log (chan, part, off, ts, key, headers, body)
    SELECT m.chan, m.part, heads.first + m.rank, heads.ts, m.key, m.headers, m.body
    FROM unnest(%b::integer[], %b::integer[], %b::integer[], %b::text[], %b::bytea[], %b::bytea[])
         AS m (chan, part, rank, key, headers, body)
    JOIN heads USING (chan, part)
)
SELECT pg_notify(%s, 'c:' || chan) FROM (SELECT DISTINCT chan FROM heads) AS c
"""


class Pending:
    """The messages of one publish to one channel, by column: the partition, key,
    headers (JSON) and body of each, in publish order."""

    __slots__ = ("bodies", "cid", "headers", "keys", "parts")

    def __init__(
        self,
        cid: int,
        parts: list[int],
        keys: list[str | None],
        headers: list[bytes],
        bodies: list[bytes],
    ) -> None:
        self.cid = cid
        self.parts = parts
        self.keys = keys
        self.headers = headers
        self.bodies = bodies


def pending(
    cid: int, partitions: int, counter: int, messages: Sequence[OutgoingMessage]
) -> Pending:
    """``messages`` to append to channel ``cid`` of ``partitions`` partitions: each at
    ``partition_for`` its key (inlined: this runs for every message published), the
    keyless ones round-robin from ``counter``."""
    keys = [m.key for m in messages]
    parts = [
        i % partitions if key is None else crc32(key.encode()) % partitions
        for i, key in enumerate(keys, counter)
    ]
    return Pending(
        cid, parts, keys, [encode_headers(m.headers) for m in messages], [m.body for m in messages]
    )


async def append(
    conn: AsyncConnection[Any], schema: str, notify_channel: str, publishes: Sequence[Pending]
) -> None:
    """Append the messages of ``publishes`` in order, each at the next offset of its
    partition, and notify the consumers of every channel written: one statement, so
    one round trip and (on an autocommit connection) one transaction.

    ``locked`` takes the partition rows in (channel, partition) order before the
    update can touch them: the update only reaches rows ``locked`` returned, and
    the primary key of ``log`` refuses any offset given twice. A message's offset is
    its partition's head plus its ``rank`` among this statement's messages of that
    partition, counted here. The arrays go in binary, built by ``_arrays``: no
    quoting or parsing of array literals on either side.
    """
    if len(publishes) == 1:
        only = publishes[0]
        chans = [only.cid] * len(only.parts)
        parts, keys, headers, bodies = only.parts, only.keys, only.headers, only.bodies
    else:
        chans, parts, keys, headers, bodies = [], [], [], [], []
        for p in publishes:
            chans += [p.cid] * len(p.parts)
            parts += p.parts
            keys += p.keys
            headers += p.headers
            bodies += p.bodies
    counts: dict[tuple[int, int], int] = {}
    ranks: list[int] = []
    rank = ranks.append
    for pair in zip(chans, parts, strict=True):
        n = counts.get(pair, 0)
        counts[pair] = n + 1
        rank(n)
    touched = sorted(counts)
    await conn.execute(
        sql(_APPEND, schema),
        (
            int4_array([c for c, _ in touched]),
            int4_array([p for _, p in touched]),
            int4_array([counts[t] for t in touched]),
            int4_array(chans),
            int4_array(parts),
            int4_array(ranks),
            text_array(keys),
            bytea_array(headers),
            bytea_array(bodies),
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
SELECT r.i, l.off, extract(epoch FROM l.ts)::float8, l.key, l.headers, l.body
FROM unnest(%b::integer[], %b::integer[], %b::bigint[], %b::integer[])
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
    first offset, count)`` up to ``count`` messages from ``first offset``, in order,
    each row starting with the number of its range (from 1)."""
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
