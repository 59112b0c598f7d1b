"""The benchmark's processes. Each reports JSON lines on stdout:
``{"ready": true}`` once it can start, then one result object.

    python -m benchmarks._workers ROLE URL_OR_PATH [options]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
import zlib
from typing import Any

import msgspec

from benchmarks._event import CHANNEL, decode_body, from_delivery, make_event, to_message
from nervus.transports import Transport, from_url

GROUP = "bench"


def report(**fields: Any) -> None:
    fields.setdefault("cpu_s", time.process_time())
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def wait_for_go() -> None:
    """Block until the parent writes a line: every process starts on the same cue."""
    sys.stdin.readline()


# -- nervus ------------------------------------------------------------------------------


async def nervus_producer(url: str, events: int, batch: int, in_flight: int) -> None:
    transport = from_url(url)
    await transport.connect()
    await transport.ensure_channel(CHANNEL)
    report(ready=True)
    await asyncio.get_running_loop().run_in_executor(None, wait_for_go)
    started = time.time()
    pending: set[asyncio.Task[None]] = set()
    for first in range(0, events, batch):
        messages = [to_message(make_event(n)) for n in range(first, min(first + batch, events))]
        # Up to ``in_flight`` publish calls at once, as concurrent handlers would make;
        # the transport commits the ones that meet in one transaction.
        if len(pending) >= in_flight:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        pending.add(asyncio.create_task(transport.publish(CHANNEL, messages)))
    await asyncio.gather(*pending)
    finished = time.time()
    await transport.close()
    report(first_publish=started, last_publish=finished, events=events)


async def nervus_consumer(url: str, events: int, fetch: int, latency: bool) -> None:
    transport = from_url(url)
    await transport.connect()
    await transport.ensure_channel(CHANNEL)
    subscription = await transport.subscribe([CHANNEL], GROUP)
    report(ready=True)
    received = 0
    first: float | None = None
    delays: list[float] = []
    while received < events:
        batch = await subscription.fetch(fetch, 1.0)
        if first is None and batch:
            first = time.time()
        for delivery in batch:
            event = from_delivery(delivery.headers, delivery.body)
            if latency:
                delays.append(time.time() - event.sent_at)
            await subscription.ack([delivery])
        received += len(batch)
    last_ack = time.time()
    await subscription.close()
    await transport.close()
    report(first_delivery=first, last_ack=last_ack, received=received, delays=delays)


async def latency_producer(url: str, rate: float, duration: float) -> None:
    transport: Transport = from_url(url)
    await transport.connect()
    await transport.ensure_channel(CHANNEL)
    report(ready=True)
    await asyncio.get_running_loop().run_in_executor(None, wait_for_go)
    total = int(rate * duration)
    start = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()
    publish_s: list[float] = []
    errors: list[str] = []

    async def publish(n: int) -> None:
        began = time.perf_counter()
        try:
            await transport.publish(CHANNEL, [to_message(make_event(n))])
        except Exception as exc:  # reported below: a lost publish must show in the figures
            errors.append(repr(exc))
            return
        publish_s.append(time.perf_counter() - began)

    for n in range(total):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # one publish call per event, each in its own task, as handlers would do
        task = asyncio.create_task(publish(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    await transport.close()
    report(events=total, publish_s=publish_s, failed=len(errors), errors=errors[:3])


# -- raw sqlite3 -----------------------------------------------------------------------

RAW_SCHEMA = """
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY, chan INTEGER NOT NULL, part INTEGER NOT NULL, off INTEGER NOT NULL,
    ts REAL NOT NULL, key TEXT, headers BLOB NOT NULL, body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS log_position ON log (chan, part, off);
CREATE TABLE IF NOT EXISTS offsets (
    grp TEXT NOT NULL, chan INTEGER NOT NULL, part INTEGER NOT NULL, committed INTEGER NOT NULL,
    PRIMARY KEY (grp, chan, part)
) WITHOUT ROWID;
"""


def raw_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for statement in RAW_SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    return conn


def raw_producer(path: str, events: int, batch: int, partitions: int) -> None:
    conn = raw_connect(path)
    template = to_message(make_event(0))
    headers = msgspec.msgpack.encode(template.headers)
    heads = [0] * partitions
    report(ready=True)
    wait_for_go()
    started = time.time()
    for first in range(0, events, batch):
        rows = []
        now = time.time()
        for n in range(first, min(first + batch, events)):
            key = f"order-{n:010d}"
            part = zlib.crc32(key.encode()) % partitions
            off = heads[part]
            heads[part] = off + 1
            rows.append((1, part, off, now, key, headers, template.body))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO log (chan, part, off, ts, key, headers, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
    finished = time.time()
    conn.close()
    report(first_publish=started, last_publish=finished, events=events)


def raw_consumer(path: str, events: int, fetch: int, partitions: int) -> None:
    conn = raw_connect(path)
    # Offsets get the durability nervus gives consumer positions: no fsync of their own.
    conn.execute("PRAGMA synchronous=NORMAL")
    report(ready=True)
    cursors = [0] * partitions
    received = 0
    first: float | None = None
    while received < events:
        got = 0
        for part in range(partitions):
            rows = conn.execute(
                "SELECT off, key, headers, body FROM log WHERE chan = 1 AND part = ? AND off >= ? "
                "ORDER BY off LIMIT ?",
                (part, cursors[part], max(fetch // partitions, 1)),
            ).fetchall()
            if not rows:
                continue
            if first is None:
                first = time.time()
            cursors[part] = rows[-1][0] + 1
            got += len(rows)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR REPLACE INTO offsets VALUES ('bench', 1, ?, ?)", (part, cursors[part])
            )
            conn.execute("COMMIT")
        received += got
        if not got:
            time.sleep(0.001)
    last_ack = time.time()
    conn.close()
    report(first_delivery=first, last_ack=last_ack, received=received)


# -- the peer: persist-queue's SQLiteAckQueue -------------------------------------------
# A durable SQLite-backed queue with acknowledgements, used with its defaults: each
# ``put`` commits on its own, each ``get`` marks the item unacked, ``ack`` settles it.


def peer_producer(path: str, events: int) -> None:
    import persistqueue

    queue = persistqueue.SQLiteAckQueue(path, multithreading=False)
    report(ready=True)
    wait_for_go()
    started = time.time()
    for n in range(events):
        queue.put(to_message(make_event(n)).body)
    finished = time.time()
    report(first_publish=started, last_publish=finished, events=events)


def peer_consumer(path: str, events: int) -> None:
    import persistqueue

    queue = persistqueue.SQLiteAckQueue(path, multithreading=False)
    report(ready=True)
    received = 0
    first: float | None = None
    while received < events:
        try:
            item = queue.get(block=True, timeout=0.5)
        except persistqueue.Empty:
            continue
        if first is None:
            first = time.time()
        decode_body(item)
        queue.ack(item)
        received += 1
    last_ack = time.time()
    report(first_delivery=first, last_ack=last_ack, received=received)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._workers")
    parser.add_argument(
        "role",
        choices=[
            "nervus-producer",
            "nervus-consumer",
            "latency-producer",
            "latency-consumer",
            "raw-producer",
            "raw-consumer",
            "peer-producer",
            "peer-consumer",
        ],
    )
    parser.add_argument("target", help="transport URL (nervus) or database path (raw)")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--fetch", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.role == "nervus-producer":
        asyncio.run(nervus_producer(args.target, args.events, args.batch, args.in_flight))
    elif args.role == "nervus-consumer":
        asyncio.run(nervus_consumer(args.target, args.events, args.fetch, latency=False))
    elif args.role == "latency-producer":
        asyncio.run(latency_producer(args.target, args.rate, args.duration))
    elif args.role == "latency-consumer":
        total = int(args.rate * args.duration)
        asyncio.run(nervus_consumer(args.target, total, args.fetch, latency=True))
    elif args.role == "raw-producer":
        raw_producer(args.target, args.events, args.batch, args.partitions)
    elif args.role == "peer-producer":
        peer_producer(args.target, args.events)
    elif args.role == "peer-consumer":
        peer_consumer(args.target, args.events)
    else:
        raw_consumer(args.target, args.events, args.fetch, args.partitions)


if __name__ == "__main__":
    main()
