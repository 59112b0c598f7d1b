"""One side of the store benchmark in a process of its own (so its CPU time is its
own), on a database of its own: it opens the side, prints ``{"ready": true}``, then
runs each step asked on stdin (one JSON line: step, start, count ...) and answers
with one JSON line of timings, until ``quit``.

    python -m benchmarks._store_worker SIDE STORE TARGET [--schema NAME]

SIDE is nervus, raw or eventsourcing; STORE is sqlite (TARGET: a file path) or
postgres (TARGET: a PostgreSQL URL; ``--schema`` names the fresh schema to use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from benchmarks._store_sides import (
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


STEPS = ("append_one", "append_many", "seed", "cycles", "read_all")


async def step(side: Side, request: dict[str, Any]) -> dict[str, Any]:
    """Run one step and time it: wall seconds, CPU seconds of the process (all its
    threads) and how many operations it did."""
    name, start, count = request["step"], request.get("start", 0), request.get("count", 0)
    if name == "append_one":
        work = side.append_one(start, count)
    elif name == "append_many":
        await side.prepare(request["width"])
        work = side.append_many(start, count, request["width"])
    elif name == "seed":
        work = side.seed(start, count)
    elif name == "cycles":
        work = side.cycles(start, count)
    elif name == "read_all":
        work = side.read_all(request["page"])
    else:
        raise ValueError(f"unknown step {name!r}; steps are {STEPS}")
    cpu, wall = time.process_time(), time.perf_counter()
    result = await work
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "operations": result if isinstance(result, int) else count,
        "seconds": wall,
        "cpu_s": cpu,
    }


async def serve(args: argparse.Namespace) -> None:
    """Answer each request line (JSON) of stdin with one JSON line, until ``quit``."""
    if args.side == "raw":
        await create_tables(args)
    side = build(args)
    await side.open()
    loop = asyncio.get_running_loop()
    try:
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "quit":
                return
            try:
                answer = await step(side, json.loads(line))
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
    finally:
        await side.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._store_worker")
    parser.add_argument("side", choices=["nervus", "raw", "eventsourcing"])
    parser.add_argument("store", choices=["sqlite", "postgres"])
    parser.add_argument("target")
    parser.add_argument("--schema", default="")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
