"""One side of the store benchmark in a process of its own (so its CPU time is its
own): runs every step on its database and prints one JSON line of timings.

    python -m benchmarks._store_worker SIDE STORE TARGET [options]

SIDE is nervus, raw or eventsourcing; STORE is sqlite (TARGET: a file path) or
postgres (TARGET: a PostgreSQL URL; ``--schema`` names the fresh schema to use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

from benchmarks._store_sides import (
    ORDER_EVENTS,
    EventsourcingSide,
    NervusSide,
    RawPostgresSide,
    RawSqliteSide,
    Side,
)
from nervus.storage import store_from_url


def build(args: argparse.Namespace) -> Side:
    if args.store == "sqlite":
        if args.side == "nervus":
            return NervusSide(f"sqlite:///{args.target}?synchronous=full")
        if args.side == "raw":
            return RawSqliteSide(args.target)
        return EventsourcingSide(
            {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": args.target}
        )
    separator = "&" if "?" in args.target else "?"
    if args.side == "nervus":
        return NervusSide(f"{args.target}{separator}schema={args.schema}")
    if args.side == "raw":
        return RawPostgresSide(args.target, args.schema)
    parts = urlsplit(args.target)
    return EventsourcingSide(
        {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parts.path.lstrip("/"),
            "POSTGRES_HOST": parts.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": parts.username or "",
            "POSTGRES_PASSWORD": parts.password or "",
            "POSTGRES_SCHEMA": args.schema,
        }
    )


async def create_tables(args: argparse.Namespace) -> None:
    """The raw side writes into the store's own tables: let the store create them."""
    if args.store == "sqlite":
        url = f"sqlite:///{args.target}"
    else:
        separator = "&" if "?" in args.target else "?"
        url = f"{args.target}{separator}schema={args.schema}"
    async with store_from_url(url):
        pass


class Timer:
    def __init__(self) -> None:
        self.figures: dict[str, dict[str, Any]] = {}

    async def step(self, name: str, operations: int, work: Any) -> Any:
        cpu, wall = time.process_time(), time.perf_counter()
        result = await work
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if isinstance(result, int):
            operations = result
        self.figures[name] = {
            "operations": operations,
            "seconds": round(wall, 4),
            "per_s": round(operations / wall, 1),
            "cpu_us_per_operation": round(cpu / operations * 1e6, 1),
        }
        return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.side == "raw":
        await create_tables(args)
    side = build(args)
    timer = Timer()
    n = args.commands
    await side.open()
    try:
        await timer.step("append_one", n, side.append_one(0, n))
        await timer.step("append_many", n, side.append_many(n, n, args.width))
        first = 2 * n
        await timer.step("seed", args.cycles, side.seed(first, args.cycles))
        await timer.step("cycles", args.cycles, side.cycles(first, args.cycles))
        stored = 2 * n + args.cycles * (ORDER_EVENTS + 1)
        rest = max(0, args.events - stored)
        orders = -(-rest // ORDER_EVENTS)
        await timer.step("fill", orders, side.seed(first + args.cycles, orders))
        expected = stored + orders * ORDER_EVENTS
        read = await timer.step("read_all", expected, side.read_all(args.page))
        if read != expected:
            raise RuntimeError(f"{args.side} read {read} events, {expected} were stored")
    finally:
        await side.close()
    return timer.figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._store_worker")
    parser.add_argument("side", choices=["nervus", "raw", "eventsourcing"])
    parser.add_argument("store", choices=["sqlite", "postgres"])
    parser.add_argument("target")
    parser.add_argument("--schema", default="")
    parser.add_argument("--commands", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--cycles", type=int, required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--page", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
