"""The outbox benchmark: the user's transaction with and without the transactional
outbox, and the relay publishing what it enqueued, on one store; prints one JSON
document.

    python -m benchmarks.outbox --store sqlite|postgres [--rate N] [--duration S]

Figures (one process, a fresh file or fresh schemas, the same durability for all):

``transactions``  one order row inserted per transaction, ``plain`` (the row alone)
                  and ``outbox`` (the row and ``tx.publish`` of one ~200-byte typed
                  event), one at a time and ``--width`` (16) at a time; the two sides
                  take turns, ``--chunks`` turns each. ``outbox_to_plain``: the
                  outbox transaction's time over the plain one's (target: 1.3 or less)
``drain``         a backlog of ``--backlog`` committed events published by
                  ``OutboxRelay``: events/s from the relay's start to the broker's
                  acceptance of the last one
``end_to_end``    ``--events`` outbox transactions from ``--width`` writers while the
                  relay runs: events/s from the first transaction to the last acceptance
``latency``       outbox transactions started at ``--rate`` per second for
                  ``--duration`` s, the relay running: commit to broker acceptance,
                  p50/p90/p99/max (target on PostgreSQL: p99 under 50 ms at 1,000/s)

The relay publishes to the embedded SQLite log in the store's own file (a service's
default) for ``--store sqlite``, and to the PostgreSQL log in a schema of its own on
the same server for ``--store postgres``; ``--transport URL`` names another broker.
See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks._machine import machine
from benchmarks._outbox_work import OutboxBench, Timed, timed
from nervus.errors import NervusError

DEFAULT_URL = "postgresql://nervus:nervus@127.0.0.1:5432/nervus"
MAX_OUTBOX_TO_PLAIN = 1.3
MAX_P99_MS = {"postgres": 50.0}  # at --rate 1,000/s


def urls(args: argparse.Namespace, token: str, workdir: Path) -> tuple[str, str, str]:
    """The store's URL, the transport's, and the prefix of the relay's channels."""
    width = args.width
    if args.store == "sqlite":
        path = workdir / "outbox.db"
        store = f"sqlite:///{path}?synchronous=full"
        transport = args.transport or f"sqlite:///{path}?synchronous=full"
    else:
        separator = "&" if "?" in args.url else "?"
        store = f"{args.url}{separator}schema=bench_outbox_{token}&pool_size={width + 2}"
        transport = args.transport or f"{args.url}{separator}schema=bench_outbox_log_{token}"
    # a broker of its own (file, schema) needs no fresh channel; a shared one does
    prefix = f"bench-outbox-{token}." if args.transport else ""
    return store, transport, prefix


class Numbers:
    """Order numbers, never the same twice in a run (the business rows' keys)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, count: int) -> int:
        first, self.next = self.next, self.next + count
        return first


async def transactions(bench: OutboxBench, args: argparse.Namespace, numbers: Numbers) -> Any:
    """Plain and outbox transactions, taking turns chunk by chunk so a change in the
    machine's load falls on both alike."""
    sides = ("plain", "outbox")
    for outbox in (False, True):  # warm up: connections, statements, pages
        await bench.one_at_a_time(numbers.take(100), 100, outbox)
        await bench.concurrent(numbers.take(200), 200, args.width, outbox)
    figures: dict[str, Any] = {}
    for mode in ("one_at_a_time", "concurrent"):
        totals = {side: Timed() for side in sides}
        ratios: list[float] = []
        size = -(-args.transactions // args.chunks)
        for chunk in range(args.chunks):
            order = sides if chunk % 2 == 0 else sides[::-1]
            turn: dict[str, Timed] = {}
            for side in order:
                outbox = side == "outbox"
                start = numbers.take(size)
                if mode == "one_at_a_time":
                    work = bench.one_at_a_time(start, size, outbox)
                else:
                    work = bench.concurrent(start, size, args.width, outbox)
                turn[side] = await timed(work)
                totals[side].add(turn[side])
            ratios.append(turn["outbox"].seconds / turn["plain"].seconds)
        ratio = totals["outbox"].seconds / totals["plain"].seconds
        figures[mode] = {
            "plain": totals["plain"].figures(),
            "outbox": totals["outbox"].figures(),
            "outbox_to_plain": round(ratio, 3),
            "outbox_to_plain_each_turn": [round(r, 3) for r in ratios],
            "cpu_outbox_to_plain": round(totals["outbox"].cpu_s / totals["plain"].cpu_s, 3),
            "target": {
                "at_most": MAX_OUTBOX_TO_PLAIN,
                "meets_target": ratio <= MAX_OUTBOX_TO_PLAIN,
            },
        }
        if mode == "concurrent":
            figures[mode]["width"] = args.width
    return figures


async def run(args: argparse.Namespace, token: str, workdir: Path, figures: dict[str, Any]) -> None:
    """Every figure, one after the other, into ``figures``."""
    store_url, transport_url, prefix = urls(args, token, workdir)
    bench = OutboxBench(store_url, transport_url, prefix)
    numbers = Numbers()
    try:
        await bench.open()
        figures["transactions"] = await transactions(bench, args, numbers)
        left = await bench.pending()  # what the outbox side enqueued: published, untimed
        bench.published.expect(left)
        bench.start_relay()
        await bench.wait_published(args.timeout)
        await bench.settle(args.timeout)
        await bench.stop_relay()
        figures["drain"] = await bench.drain(numbers.take(args.backlog), args.backlog, args.timeout)
        figures["end_to_end"] = await bench.end_to_end(
            numbers.take(args.events), args.events, args.width, args.timeout
        )
        total = int(args.rate * args.duration)
        latency = await bench.latency(
            numbers.take(total), args.rate, args.duration, args.timeout, args.in_flight
        )
        wanted = MAX_P99_MS.get(args.store)
        if wanted is not None:
            latency["target"] = {
                "p99_ms_under": wanted,
                "at_rate_per_s": 1000,
                "meets_target": latency["committed_per_s"] >= 1000 * 0.98
                and latency["p99_ms"] < wanted,
            }
        figures["latency"] = latency
        if await bench.pending():
            raise RuntimeError("events were left unpublished in the outbox")
    finally:
        await bench.close()
        figures["cleaned_up"] = clean(args, token, workdir, transport_url, bench.channels)


def clean(
    args: argparse.Namespace, token: str, workdir: Path, transport: str, channels: set[str]
) -> list[str]:
    removed: list[str] = []
    shutil.rmtree(workdir, ignore_errors=True)
    if args.store == "postgres":
        for schema in (f"bench_outbox_{token}", f"bench_outbox_log_{token}"):
            _postgres(args.url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            removed.append(f"postgres schema {schema}")
    if args.transport:
        from benchmarks._brokers import CLEANERS

        scheme = urlsplit(transport).scheme
        broker = {"postgresql": "postgres", "amqp": "rabbitmq"}.get(scheme, scheme)
        cleaner = CLEANERS.get(broker)
        if cleaner is not None:
            removed += cleaner(transport, re.compile(re.escape(token)))
        elif channels:
            removed.append(f"left on {broker}: channels {sorted(channels)}")
    return removed


def _postgres(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    found: dict[str, Any] = {
        "store": args.store,
        "transactions": args.transactions,
        "turns": args.chunks,
        "width": args.width,
        "backlog": args.backlog,
        "events": args.events,
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "in_flight": args.in_flight,
        "relay": "OutboxRelay in the writers' process, batch 500, publishing with "
        "transport.publish (one call per channel per batch)",
        "versions": {"nervus": version("nervus")},
    }
    if args.store == "sqlite":
        found["durability"] = "WAL, synchronous=FULL for the store and the log"
        found["transport"] = args.transport or "sqlite: the embedded log in the store's file"
        found["versions"]["sqlite"] = sqlite3.sqlite_version
    else:
        import psycopg

        with psycopg.connect(args.url) as conn:
            row = conn.execute("SHOW synchronous_commit").fetchone()
            server = conn.execute("SHOW server_version").fetchone()
            tls = conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        found["tls"] = bool(tls and tls[0])
        found["durability"] = f"synchronous_commit={row[0] if row else '?'} (the server's)"
        found["transport"] = args.transport or (
            "postgresql: the PostgreSQL log in a schema of its own on the same server"
        )
        found["versions"].update(
            {"postgresql": server[0] if server else "?", "asyncpg": version("asyncpg")}
        )
    if args.transport:
        parts = urlsplit(args.transport)
        found["transport"] = f"{parts.scheme}://{parts.hostname}:{parts.port}"
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.outbox",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--url", default=DEFAULT_URL, help="the PostgreSQL server (postgres)")
    parser.add_argument("--transport", default=None, help="the relay's broker (default: see above)")
    parser.add_argument(
        "--transactions", type=int, default=4000, help="transactions per side and mode"
    )
    parser.add_argument("--chunks", type=int, default=8, help="turns each side takes per mode")
    parser.add_argument("--width", type=int, default=16, help="concurrent transactions")
    parser.add_argument("--backlog", type=int, default=20000, help="events the relay drains")
    parser.add_argument("--events", type=int, default=10000, help="events of end_to_end")
    parser.add_argument("--rate", type=float, default=1000.0, help="transactions/s (latency)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (latency)")
    parser.add_argument(
        "--in-flight", type=int, default=64, help="transactions open at once at most (latency)"
    )
    parser.add_argument("--dir", default=None, help="where the SQLite file goes (sqlite)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds the relay may take for a figure"
    )
    args = parser.parse_args(argv)

    token = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="nervus-outbox-bench-", dir=args.dir))
    document: dict[str, Any] = {
        "machine": machine(load_average_1m_at_start=round(os.getloadavg()[0], 2)),
        "settings": settings(args),
    }
    figures: dict[str, Any] = {}
    document["figures"] = figures
    try:
        asyncio.run(run(args, token, workdir, figures))
    except (RuntimeError, TimeoutError, NervusError) as exc:
        document["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir, ignore_errors=True)
    document["meets_targets"] = "error" not in document and all(
        entry["target"]["meets_target"]
        for entry in [*figures.get("transactions", {}).values(), figures.get("latency", {})]
        if "target" in entry
    )
    document["machine"]["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
