"""The event store benchmark: nervus, raw driver inserts into the same schema, and the
eventsourcing library, in the same run on the same database; prints one JSON document.

    python -m benchmarks.store --store sqlite|postgres [--events N] [--repeat N] [--url URL]

Figures (each side in a process of its own, on a fresh file or schema of its own;
the sides take turns, ``--chunks`` turns per figure, so load changes hit all alike):

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

from benchmarks._machine import machine
from benchmarks._store_sides import (
    ORDER_EVENTS,
    EventsourcingSide,
    NervusSide,
    RawPostgresSide,
    RawSqliteSide,
)

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


class Worker:
    """One side's process (``benchmarks._store_worker``) on a database of its own."""

    def __init__(self, args: argparse.Namespace, side: str, workdir: Path, name: str) -> None:
        self.side = side
        self.args = args
        if args.store == "sqlite":
            self.target = str(workdir / f"{name}.db")
            command = [self.target]
        else:
            self.target = name
            _postgres(args.url, f"CREATE SCHEMA {name}")
            command = [args.url, "--schema", name]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._store_worker", side, args.store, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._answer()  # ready

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait(self.args.timeout)
            assert self.process.stderr is not None
            tail = self.process.stderr.read().strip().splitlines()[-5:]
            raise RuntimeError(f"{self.side} exited with {code}: " + " | ".join(tail))
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.side}: {answer['error']}")
        return answer

    def close(self) -> None:
        """Stop the process and remove its database."""
        try:
            if self.process.poll() is None:
                assert self.process.stdin is not None
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(self.args.timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            if self.args.store == "sqlite":
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(f"{self.target}{suffix}")
            else:
                _postgres(self.args.url, f"DROP SCHEMA IF EXISTS {self.target} CASCADE")


def run_round(args: argparse.Namespace, workdir: Path, token: str, n: int) -> dict[str, Any]:
    """One round: the three sides take turns, chunk by chunk, through every figure,
    so a change in the machine's load falls on all of them alike."""
    order = SIDES[n % 3 :] + SIDES[: n % 3]  # each round starts with another side
    workers: dict[str, Worker] = {}
    totals = {side: {f: [0, 0.0, 0.0] for f in FIGURES} for side in SIDES}

    def timed(figure: str, side: str, **request: Any) -> None:
        answer = workers[side].ask(**request)
        total = totals[side][figure]
        total[0] += answer["operations"]
        total[1] += answer["seconds"]
        total[2] += answer["cpu_s"]

    try:
        for side in order:
            workers[side] = Worker(args, side, workdir, f"bench_store_{token}_{side}_{n}")
        chunks, width = args.chunks, args.width
        size = -(-args.commands // chunks)
        cycle_size = -(-args.cycles // chunks)
        for c in range(chunks):
            for side in order:
                timed("append_one", side, step="append_one", start=c * size, count=size)
        first = chunks * size
        for c in range(chunks):
            for side in order:
                start = first + c * size
                timed("append_many", side, step="append_many", start=start, count=size, width=width)
        first += chunks * size
        for side in order:  # orders of 10 events to load (not timed)
            workers[side].ask(step="seed", start=first, count=chunks * cycle_size)
        for c in range(chunks):
            for side in order:
                start = first + c * cycle_size
                timed("cycles", side, step="cycles", start=start, count=cycle_size)
        stored = first + chunks * cycle_size * (ORDER_EVENTS + 1)
        first += chunks * cycle_size
        more = max(0, -(-(args.events - stored) // ORDER_EVENTS))
        for side in order:  # more orders until the log holds --events (not timed)
            workers[side].ask(step="seed", start=first, count=more)
        expected = stored + more * ORDER_EVENTS
        for _ in range(args.read_passes):
            for side in order:
                timed("read_all", side, step="read_all", page=args.page)
        for side in order:
            read = totals[side]["read_all"][0]
            if read != expected * args.read_passes:
                raise RuntimeError(
                    f"{side} read {read} events in {args.read_passes} passes of {expected}"
                )
    except RuntimeError as exc:
        return {"error": str(exc)}
    finally:
        for worker in workers.values():
            worker.close()
    return {
        side: {
            figure: {
                "operations": ops,
                "per_s": ops / seconds,
                "cpu_us_per_operation": cpu / ops * 1e6,
            }
            for figure, (ops, seconds, cpu) in figures.items()
        }
        for side, figures in totals.items()
    }


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
            values = [r[side][figure] for r in rounds if "error" not in r]
            if not values:
                errors = [r["error"] for r in rounds if "error" in r]
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
        # the ratio of each round (both sides measured turn by turn, under the same
        # load), and their median: steadier than the ratio of the medians
        ratios: dict[str, Any] = {}
        for other in ("raw", "eventsourcing"):
            each = [
                r["nervus"][figure]["per_s"] / r[other][figure]["per_s"]
                for r in rounds
                if "error" not in r
            ]
            if each:
                ratios[f"nervus_to_{other}"] = round(statistics.median(each), 3)
                ratios[f"nervus_to_{other}_each_round"] = [round(x, 3) for x in each]
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
        "turns_per_figure": args.chunks,
        "read_passes": args.read_passes,
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
    parser.add_argument(
        "--chunks", type=int, default=4, help="turns each side takes per figure in a round"
    )
    parser.add_argument(
        "--read-passes", type=int, default=3, help="times each side reads the whole log"
    )
    parser.add_argument("--dir", default=None, help="where the SQLite files go (sqlite)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a side may take to stop"
    )
    args = parser.parse_args(argv)

    token = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="nervus-store-bench-", dir=args.dir))
    document: dict[str, Any] = {
        "machine": machine(load_average_1m_at_start=round(os.getloadavg()[0], 2)),
        "settings": settings(args),
    }
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        for n in range(args.repeat):
            rounds.append(run_round(args, workdir, token, n))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    document["figures"] = summarize(rounds, args.store)
    document["errors"] = [r["error"] for r in rounds if "error" in r]
    document["meets_targets"] = document["figures"].pop("meets_targets")
    document["machine"]["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
