"""The event store benchmark: nervus, raw driver inserts into the same schema, and the
eventsourcing library, in the same run on the same database; prints one JSON document.

    python -m benchmarks.store --store sqlite|postgres [--events N] [--repeat N] [--url URL]

Figures (each side in a process of its own, on a fresh file or schema of its own):

``append_one``   single-event commands on new aggregates, issued one at a time
``append_many``  the same, ``--width`` (64) at a time from one process
``cycles``       load-decide-append on existing aggregates of 10 events, no snapshot
``read_all``     every event of the store (``--events``, 100,000) in order, decoded

Same durability everywhere: SQLite in WAL mode with ``synchronous=FULL``;
PostgreSQL with the server's ``synchronous_commit`` (``on`` by default).
See ``benchmarks/README.md`` for what each side does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks._store_sides import EventsourcingSide, NervusSide, RawPostgresSide, RawSqliteSide

SIDES = ("nervus", "raw", "eventsourcing")
FIGURES = ("append_one", "append_many", "cycles", "read_all")
DEFAULT_URL = "postgresql://nervus:nervus@127.0.0.1:5432/nervus"

# nervus / the other side, per figure and store: (other side, target)
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "sqlite": {
        "append_one": ("raw", 0.8),
        "append_many": ("eventsourcing", 3.0),
        "read_all": ("raw", 0.7),
    },
    "postgres": {
        "append_one": ("raw", 0.8),
        "append_many": ("eventsourcing", 10.0),
        "read_all": ("raw", 0.7),
    },
}


def run_side(
    args: argparse.Namespace, side: str, workdir: Path, token: str, n: int
) -> dict[str, Any]:
    """One side's figures, from a process of its own; its database is removed after."""
    options = [
        "--commands",
        str(args.commands),
        "--width",
        str(args.width),
        "--cycles",
        str(args.cycles),
        "--events",
        str(args.events),
        "--page",
        str(args.page),
    ]
    if args.store == "sqlite":
        target = workdir / f"{side}-{n}.db"
        command = [str(target)]
    else:
        schema = f"bench_store_{token}_{side}_{n}"
        command = [args.url, "--schema", schema]
        _postgres(args.url, f"CREATE SCHEMA {schema}")
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks._store_worker",
                side,
                args.store,
                *command,
                *options,
            ],
            capture_output=True,
            text=True,
            timeout=args.timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{side} did not finish within {args.timeout} s"}
    finally:
        if args.store == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"{target}{suffix}")
        else:
            _postgres(args.url, f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    if done.returncode != 0 or not done.stdout.strip():
        tail = done.stderr.strip().splitlines()[-5:]
        return {"error": f"{side} exited with {done.returncode}: " + " | ".join(tail)}
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def _postgres(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def summarize(rounds: list[dict[str, dict[str, Any]]], store: str) -> dict[str, Any]:
    """Medians over the rounds, per figure and side, and nervus's ratios to the others."""
    document: dict[str, Any] = {}
    for figure in FIGURES:
        entry: dict[str, Any] = {}
        for side in SIDES:
            values = [r[side][figure] for r in rounds if figure in r.get(side, {})]
            if not values:
                errors = [r[side]["error"] for r in rounds if "error" in r.get(side, {})]
                entry[side] = {"error": errors[0] if errors else "not measured"}
                continue
            entry[side] = {
                "per_s": round(statistics.median(v["per_s"] for v in values)),
                "per_s_each_round": [round(v["per_s"]) for v in values],
                "cpu_us_per_operation": round(
                    statistics.median(v["cpu_us_per_operation"] for v in values), 1
                ),
                "operations": values[0]["operations"],
            }
        ratios: dict[str, Any] = {}
        nervus = entry["nervus"].get("per_s")
        for other in ("raw", "eventsourcing"):
            theirs = entry[other].get("per_s")
            if nervus and theirs:
                ratios[f"nervus_to_{other}"] = round(nervus / theirs, 3)
        entry["ratios"] = ratios
        target = TARGETS[store].get(figure)
        if target is not None:
            other, wanted = target
            ratio = ratios.get(f"nervus_to_{other}")
            entry["target"] = {
                "ratio": f"nervus_to_{other}",
                "at_least": wanted,
                "ratio_to_target": None if ratio is None else round(ratio / wanted, 3),
                "meets_target": ratio is not None and ratio >= wanted,
            }
        document[figure] = entry
    document["meets_targets"] = all(
        document[f]["target"]["meets_target"] for f in FIGURES if "target" in document[f]
    )
    return document


def settings(args: argparse.Namespace) -> dict[str, Any]:
    how = {
        "nervus": NervusSide.how,
        "raw": (RawSqliteSide if args.store == "sqlite" else RawPostgresSide).how,
        "eventsourcing": EventsourcingSide.how,
    }
    found: dict[str, Any] = {
        "store": args.store,
        "commands": args.commands,
        "concurrent_commands": args.width,
        "cycles": args.cycles,
        "aggregate_events": 10,
        "events_read": args.events,
        "page": args.page,
        "rounds": args.repeat,
        "how": how,
        "versions": {"eventsourcing": version("eventsourcing")},
    }
    if args.store == "sqlite":
        found["durability"] = (
            "WAL, synchronous=FULL on every side (eventsourcing sets WAL and leaves "
            "synchronous at SQLite's default, FULL)"
        )
        found["directory"] = str(Path(args.dir or tempfile.gettempdir()))
        found["versions"]["sqlite"] = sqlite3.sqlite_version
    else:
        import psycopg

        with psycopg.connect(args.url) as conn:
            row = conn.execute("SHOW synchronous_commit").fetchone()
            server = conn.execute("SHOW server_version").fetchone()
            tls = conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
        found["durability"] = f"synchronous_commit={row[0] if row else '?'} on every side"
        found["tls"] = bool(tls and tls[0])
        found["versions"].update(
            {
                "postgresql": server[0] if server else "?",
                "asyncpg": version("asyncpg"),
                "psycopg": version("psycopg"),
            }
        )
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--url", default=DEFAULT_URL, help="the PostgreSQL server (postgres)")
    parser.add_argument(
        "--events", type=int, default=100_000, help="events in the store when read_all runs"
    )
    parser.add_argument(
        "--commands", type=int, default=2000, help="commands of append_one and of append_many"
    )
    parser.add_argument("--width", type=int, default=64, help="commands in flight (append_many)")
    parser.add_argument("--cycles", type=int, default=1000, help="load-decide-append cycles")
    parser.add_argument("--page", type=int, default=1000, help="events per read_all page")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians")
    parser.add_argument("--dir", default=None, help="where the SQLite files go (sqlite)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per side and round")
    args = parser.parse_args(argv)

    token = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="nervus-store-bench-", dir=args.dir))
    document: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        },
        "settings": settings(args),
    }
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        for n in range(args.repeat):
            # each round starts with another side, so no side always runs first
            order = SIDES[n % 3 :] + SIDES[: n % 3]
            rounds.append({side: run_side(args, side, workdir, token, n) for side in order})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    document["figures"] = summarize(rounds, args.store)
    document["meets_targets"] = document["figures"].pop("meets_targets")
    document["machine"]["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
