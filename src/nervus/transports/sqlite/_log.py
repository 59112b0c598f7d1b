"""The partitioned log's SQL: channels, appends, reads, replay positions, retention.

Every function runs on a connection's own thread; those that write expect to run
inside the ``Writer``'s transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

import msgspec

headers_encoder = msgspec.msgpack.Encoder()
headers_decoder = msgspec.msgpack.Decoder(dict[str, str])

# (partition, key, encoded headers, body) of one message to append
Pending = tuple[int, str | None, bytes, bytes]
# (offset, timestamp, key, encoded headers, body) of one stored message
Stored = tuple[int, float, str | None, bytes, bytes]

_SIZE = "length(headers) + length(body) + coalesce(length(key), 0)"


def ensure_channel(conn: sqlite3.Connection, name: str, partitions: int) -> tuple[int, int]:
    """Create ``name`` with ``partitions`` unless it exists; return (id, partition count)."""
    conn.execute(
        "INSERT OR IGNORE INTO nervus_channels (name, partitions, created) VALUES (?, ?, ?)",
        (name, partitions, time.time()),
    )
    cid, count = conn.execute(
        "SELECT id, partitions FROM nervus_channels WHERE name = ?", (name,)
    ).fetchone()
    conn.executemany(
        "INSERT OR IGNORE INTO nervus_partitions (chan, part) VALUES (?, ?)",
        [(cid, p) for p in range(count)],
    )
    return int(cid), int(count)


def find_channel(conn: sqlite3.Connection, name: str) -> tuple[int, int] | None:
    row = conn.execute(
        "SELECT id, partitions FROM nervus_channels WHERE name = ?", (name,)
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def append(conn: sqlite3.Connection, cid: int, messages: list[Pending]) -> None:
    """Append messages in order, giving each the next offset of its partition.

    Three statements whatever the batch size (heads, rows, new heads): every
    SQLite step hands the GIL back and forth, and while the event loop is busy
    each hand-back can wait a whole switch interval, so steps are kept few.
    """
    now = time.time()
    (found,) = conn.execute(
        "SELECT json_group_array(json_array(part, head, last_ts)) "
        "FROM nervus_partitions WHERE chan = ?",
        (cid,),
    ).fetchone()
    state: dict[int, list[float]] = {
        part: [head, last_ts, 0] for part, head, last_ts in _json_decode(found)
    }
    rows = []
    touched: set[int] = set()
    for part, key, headers, body in messages:
        touched.add(part)
        s = state[part]
        off = int(s[0])
        s[0] = off + 1
        if s[1] < now:
            s[1] = now
        s[2] += len(headers) + len(body) + (len(key) if key is not None else 0)
        rows.append((cid, part, off, s[1], key, headers, body))
    insert_values(conn, _INSERT_LOG, rows)
    insert_values(
        conn,
        _UPDATE_HEADS,
        [(cid, p, int(state[p][0]), state[p][1], int(state[p][2])) for p in touched],
    )


_json_decode = msgspec.json.Decoder(list[tuple[int, int, float]]).decode

_INSERT_LOG = ("INSERT INTO nervus_log (chan, part, off, ts, key, headers, body) VALUES ", "")
_UPDATE_HEADS = (
    "INSERT INTO nervus_partitions (chan, part, head, last_ts, bytes) VALUES ",
    " ON CONFLICT (chan, part) DO UPDATE SET head = excluded.head, "
    "last_ts = excluded.last_ts, bytes = bytes + excluded.bytes",
)
_LARGEST = 256  # rows per statement; 256 x 7 parameters stays far below SQLite's limit
_statements: dict[tuple[str, int], str] = {}


def insert_values(
    conn: sqlite3.Connection, sql: tuple[str, str], rows: Sequence[tuple[object, ...]]
) -> None:
    """Run ``sql[0] VALUES (...), (...) sql[1]`` over ``rows`` in few statements:
    chunks of 256, 128, 64 ... rows, so at most a handful of distinct statements
    are prepared and a batch of n rows takes about n/256 + log2(256) steps."""
    i, n = 0, len(rows)
    while i < n:
        size = _LARGEST
        while size > n - i:
            size //= 2
        statement = _statements.get((sql[0], size))
        if statement is None:
            width = len(rows[i])
            one = "(" + ", ".join("?" * width) + ")"
            statement = sql[0] + ", ".join([one] * size) + sql[1]
            _statements[(sql[0], size)] = statement
        conn.execute(statement, [value for row in rows[i : i + size] for value in row])
        i += size


def heads(conn: sqlite3.Connection, cids: list[int]) -> dict[tuple[int, int], int]:
    """The next offset of every partition of the given channels."""
    marks = ",".join("?" * len(cids))
    return {
        (chan, part): head
        for chan, part, head in conn.execute(
            f"SELECT chan, part, head FROM nervus_partitions WHERE chan IN ({marks})", cids
        )
    }


def read(conn: sqlite3.Connection, cid: int, part: int, start: int, limit: int) -> list[Stored]:
    return conn.execute(
        "SELECT off, ts, key, headers, body FROM nervus_log "
        "WHERE chan = ? AND part = ? AND off >= ? ORDER BY off LIMIT ?",
        (cid, part, start, limit),
    ).fetchall()


def first_offset(conn: sqlite3.Connection, cid: int, part: int) -> int | None:
    row = conn.execute(
        "SELECT off FROM nervus_log WHERE chan = ? AND part = ? ORDER BY off LIMIT 1", (cid, part)
    ).fetchone()
    return None if row is None else int(row[0])


def head(conn: sqlite3.Connection, cid: int, part: int) -> int:
    row = conn.execute(
        "SELECT head FROM nervus_partitions WHERE chan = ? AND part = ?", (cid, part)
    ).fetchone()
    return 0 if row is None else int(row[0])


def offset_at_time(conn: sqlite3.Connection, cid: int, part: int, when: float) -> int:
    """The offset of the first message at or after ``when`` (the head if none), by
    bisection over the dense offsets between the first kept one and the head."""
    low = first_offset(conn, cid, part)
    high = head(conn, cid, part)
    if low is None:
        return high
    while low < high:
        mid = (low + high) // 2
        row = conn.execute(
            "SELECT ts FROM nervus_log WHERE chan = ? AND part = ? AND off = ?", (cid, part, mid)
        ).fetchone()
        if row is None or row[0] >= when:
            high = mid
        else:
            low = mid + 1
    return low


def apply_retention(
    conn: sqlite3.Connection, now: float, max_age: float | None, max_bytes: int | None
) -> int:
    """Delete the oldest messages of each partition beyond the age and size limits;
    return how many were deleted. Retries of deleted messages go with them."""
    deleted = 0
    partitions = conn.execute("SELECT chan, part, bytes, head FROM nervus_partitions").fetchall()
    for cid, part, size, end in partitions:
        low = first_offset(conn, cid, part)
        if low is None:
            continue
        cut = low
        if max_age is not None:
            row = conn.execute(
                "SELECT off FROM nervus_log WHERE chan = ? AND part = ? AND ts >= ? "
                "ORDER BY off LIMIT 1",
                (cid, part, now - max_age),
            ).fetchone()
            cut = end if row is None else int(row[0])
        if max_bytes is not None:
            freed = _size_between(conn, cid, part, low, cut) if cut > low else 0
            excess = size - freed - max_bytes
            if excess > 0:
                for off, bytes_ in conn.execute(
                    f"SELECT off, {_SIZE} FROM nervus_log WHERE chan = ? AND part = ? "
                    "AND off >= ? ORDER BY off",
                    (cid, part, cut),
                ):
                    excess -= bytes_
                    cut = off + 1
                    if excess <= 0:
                        break
        if cut <= low:
            continue
        freed = _size_between(conn, cid, part, low, cut)
        cursor = conn.execute(
            "DELETE FROM nervus_log WHERE chan = ? AND part = ? AND off < ?", (cid, part, cut)
        )
        deleted += cursor.rowcount
        conn.execute(
            "UPDATE nervus_partitions SET bytes = max(bytes - ?, 0) WHERE chan = ? AND part = ?",
            (freed, cid, part),
        )
        conn.execute(
            "DELETE FROM nervus_retries WHERE chan = ? AND part = ? AND off < ?", (cid, part, cut)
        )
    return deleted


def _size_between(conn: sqlite3.Connection, cid: int, part: int, low: int, cut: int) -> int:
    row = conn.execute(
        f"SELECT coalesce(sum({_SIZE}), 0) FROM nervus_log "
        "WHERE chan = ? AND part = ? AND off >= ? AND off < ?",
        (cid, part, low, cut),
    ).fetchone()
    return int(row[0])
