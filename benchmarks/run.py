"""Run the benchmarks and print one JSON document.

    python -m benchmarks.run [--events N] [--rate R] [--duration S] [--dir PATH]

1. nervus end to end: a producer process publishes ``--events`` typed events in
   batches through the SQLite transport; a consumer process in a group decodes and
   acks each one. Events per second from the first publish to the last ack.
2. the raw ceiling: the same log layout with plain ``sqlite3`` (executemany in one
   transaction per batch; the reader stores its offset once per batch).
3. the ratio nervus / raw.
4. end-to-end latency at a fixed low rate, stamped in the payload, read at the consumer.

``--broker kafka|nats|redis|rabbitmq|postgres`` measures a server instead: nervus,
the broker's raw client and FastStream on it (see ``benchmarks._brokers``).

Every figure uses the same file system and durability: WAL, ``synchronous=FULL``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from benchmarks._brokers import BROKERS, run_broker
from benchmarks._machine import machine
from benchmarks._workers import raw_connect

TARGET_EVENTS_PER_S = 25_000
TARGET_RATIO = 0.6
TARGET_P99_MS = 20.0


class Worker:
    """One benchmark process speaking JSON lines."""

    def __init__(self, role: str, target: str, *options: str) -> None:
        self.role = role
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._workers", role, target, *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        text = self.process.stdout.readline()
        if not text:
            code = self.process.wait()
            raise RuntimeError(f"benchmark process {self.role} ended (exit code {code})")
        result: dict[str, Any] = json.loads(text)
        return result

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        out = self.line()
        self.process.wait(timeout)
        return out


def pair(producer: list[str], consumer: list[str], timeout: float) -> dict[str, Any]:
    """Start the consumer, then the producer, then give the cue; return both results."""
    consuming = Worker(*consumer)
    consumer_ready = consuming.line()
    producing = Worker(*producer)
    producer_ready = producing.line()
    producing.go()
    produced = producing.result(timeout)
    if produced.get("failed"):
        # the consumer would wait for events that were never published
        consuming.process.kill()
        raise RuntimeError(
            f"{produced['failed']} publishes failed, e.g. {produced.get('errors', [])[:1]}"
        )
    consumed = consuming.result(timeout)
    produced["cpu_s"] -= producer_ready["cpu_s"]
    consumed["cpu_s"] -= consumer_ready["cpu_s"]
    return {"producer": produced, "consumer": consumed}


def cpu_per_event(figures: dict[str, Any], events: int) -> dict[str, float]:
    """CPU time (all threads) each process spent per event, in microseconds."""
    return {
        role: round(figures[role]["cpu_s"] / events * 1e6, 1) for role in ("producer", "consumer")
    }


def throughput(figures: dict[str, Any], events: int) -> float:
    elapsed = float(figures["consumer"]["last_ack"]) - float(figures["producer"]["first_publish"])
    return events / elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def url_options(args: argparse.Namespace) -> str:
    """The nervus URL's query: partitions, synchronous=full, then ``--options``."""
    options = {"partitions": str(args.partitions), "synchronous": "full"}
    options.update(parse_qsl(args.options))
    return urlencode(options)


def measure_throughput(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Figures 1-3: nervus end to end, the raw sqlite3 ceiling, their ratio.

    ``--repeat`` rounds, each running nervus then raw on fresh files, so both see
    the same conditions; the figures are medians over the rounds.
    """
    common = ["--events", str(args.events), "--partitions", str(args.partitions)]
    batch = ["--batch", str(args.batch)]
    rounds: list[dict[str, Any]] = []
    for n in range(args.repeat):
        url = f"sqlite:///{workdir / f'nervus-{n}.db'}?{url_options(args)}"
        nervus = pair(
            ["nervus-producer", url, *common, *batch, "--in-flight", str(args.in_flight)],
            ["nervus-consumer", url, *common, "--fetch", str(args.fetch)],
            args.timeout,
        )
        raw_path = str(workdir / f"raw-{n}.db")
        raw_connect(raw_path).close()
        raw = pair(
            ["raw-producer", raw_path, *common, *batch],
            ["raw-consumer", raw_path, *common, "--fetch", str(args.fetch)],
            args.timeout,
        )
        publish_s = nervus["producer"]["last_publish"] - nervus["producer"]["first_publish"]
        rounds.append(
            {
                "nervus": throughput(nervus, args.events),
                "publish": args.events / publish_s,
                "raw": throughput(raw, args.events),
                "nervus_cpu": cpu_per_event(nervus, args.events),
                "raw_cpu": cpu_per_event(raw, args.events),
            }
        )
    nervus_rate = statistics.median(r["nervus"] for r in rounds)
    raw_rate = statistics.median(r["raw"] for r in rounds)
    ratio = nervus_rate / raw_rate

    def cpu(key: str) -> dict[str, float]:
        return {
            role: statistics.median(r[key][role] for r in rounds)
            for role in ("producer", "consumer")
        }

    return {
        "rounds": args.repeat,
        "nervus_events_per_s": round(nervus_rate),
        "nervus_events_per_s_each_round": [round(r["nervus"]) for r in rounds],
        "nervus_publish_events_per_s": round(statistics.median(r["publish"] for r in rounds)),
        "nervus_cpu_us_per_event": cpu("nervus_cpu"),
        "raw_events_per_s": round(raw_rate),
        "raw_events_per_s_each_round": [round(r["raw"]) for r in rounds],
        "raw_cpu_us_per_event": cpu("raw_cpu"),
        "ratio_nervus_to_raw": round(ratio, 3),
        "ratio_nervus_to_raw_each_round": [round(r["nervus"] / r["raw"], 3) for r in rounds],
        "target_events_per_s": TARGET_EVENTS_PER_S,
        "ratio_to_target": round(nervus_rate / TARGET_EVENTS_PER_S, 3),
        "target_ratio_to_raw": TARGET_RATIO,
        "ratio_to_raw_target": round(ratio / TARGET_RATIO, 3),
        "meets_targets": nervus_rate >= TARGET_EVENTS_PER_S and ratio >= TARGET_RATIO,
    }


def measure_peer(args: argparse.Namespace, workdir: Path, nervus_rate: float) -> dict[str, Any]:
    """The peer library on the same machine and file system: persist-queue's
    SQLiteAckQueue (a durable SQLite queue with acks), one producer process putting
    each event, one consumer process getting, decoding and acking each, with the
    library's defaults. Its rate is low, so it runs ``--peer-events`` events."""
    events = min(args.peer_events, args.events)
    path = str(workdir / "peer")
    figures = pair(
        ["peer-producer", path, "--events", str(events)],
        ["peer-consumer", path, "--events", str(events)],
        args.timeout,
    )
    rate = throughput(figures, events)
    return {
        "library": "persist-queue " + _version("persist-queue"),
        "events": events,
        "events_per_s": round(rate),
        "cpu_us_per_event": cpu_per_event(figures, events),
        "ratio_nervus_to_peer": round(nervus_rate / rate, 1),
    }


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


def measure_latency(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Figure 4: publish-to-consume latency at a fixed low rate, one event per publish."""
    url = f"sqlite:///{workdir / 'latency.db'}?{url_options(args)}"
    rate = ["--rate", str(args.rate), "--duration", str(args.duration)]
    latency = pair(
        ["latency-producer", url, *rate],
        ["latency-consumer", url, *rate, "--fetch", str(args.fetch)],
        args.timeout,
    )
    delays_ms = [d * 1000 for d in latency["consumer"]["delays"]]
    publish_ms = [d * 1000 for d in latency["producer"]["publish_s"]]
    p99 = percentile(delays_ms, 0.99)
    return {
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "events": len(delays_ms),
        "p50_ms": round(percentile(delays_ms, 0.50), 2),
        "p90_ms": round(percentile(delays_ms, 0.90), 2),
        "p99_ms": round(p99, 2),
        "max_ms": round(max(delays_ms), 2),
        "publish_call_p50_ms": round(percentile(publish_ms, 0.50), 2),
        "publish_call_p99_ms": round(percentile(publish_ms, 0.99), 2),
        "target_p99_ms": TARGET_P99_MS,
        "ratio_to_target": round(p99 / TARGET_P99_MS, 3),
        "meets_target": p99 < TARGET_P99_MS,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--broker",
        default="sqlite",
        choices=["sqlite", *BROKERS],
        help="sqlite (embedded) or a server; the server figures are described in _brokers",
    )
    parser.add_argument("--url", default=None, help="the server's URL (--broker other than sqlite)")
    parser.add_argument(
        "--remove-leftovers",
        action="store_true",
        help="first remove what killed broker runs left on the server (none may be running)",
    )
    parser.add_argument(
        "--faststream-logging",
        choices=["on", "off"],
        default="on",
        help="FastStream's log line per message: on (its default) or off",
    )
    parser.add_argument(
        "--faststream-events",
        type=int,
        default=10_000,
        help="events of FastStream's run (--broker other than sqlite)",
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="events per publish call")
    parser.add_argument(
        "--in-flight", type=int, default=4, help="concurrent publish calls of the nervus producer"
    )
    parser.add_argument("--fetch", type=int, default=1000, help="deliveries per fetch")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s of the latency run")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of the latency run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the throughput figures")
    parser.add_argument("--only", choices=["throughput", "latency", "peer"], default=None)
    parser.add_argument(
        "--peer-events", type=int, default=3000, help="events of the peer library's run"
    )
    parser.add_argument("--dir", default=None, help="where the database files go")
    parser.add_argument(
        "--options",
        default="",
        help="more nervus URL options, e.g. 'poll_interval=0.002' (sqlite), 'linger_ms=2' (kafka)",
    )
    args = parser.parse_args(argv)
    if args.broker != "sqlite":
        print(json.dumps(run_broker(args), indent=2))
        return
    args.timeout = max(120.0, args.events / 1000, args.duration * 5)

    workdir = Path(tempfile.mkdtemp(prefix="nervus-bench-", dir=args.dir))
    document: dict[str, Any] = {
        "machine": machine(sqlite=sqlite3.sqlite_version),
        "settings": {
            "broker": args.broker,
            "journal_mode": "wal",
            "synchronous": dict(parse_qsl(url_options(args)))["synchronous"],
            "positions_synchronous": "normal",
            "raw_synchronous": "full",
            "url_options": url_options(args),
            "partitions": args.partitions,
            "events": args.events,
            "rounds": args.repeat,
            "publish_batch": args.batch,
            "publish_calls_in_flight": args.in_flight,
            "fetch_batch": args.fetch,
            "event_body_bytes": _body_size(),
            "directory": str(workdir.parent),
        },
    }
    try:
        if args.only in (None, "throughput"):
            document["throughput"] = measure_throughput(args, workdir)
        if args.only is None:
            rate = document["throughput"]["nervus_events_per_s"]
            document["peer"] = measure_peer(args, workdir, rate)
        if args.only in (None, "latency"):
            document["latency"] = measure_latency(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    document["machine"]["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(document, indent=2))


def _body_size() -> int:
    from benchmarks._event import make_event, to_message

    return len(to_message(make_event(0)).body)


if __name__ == "__main__":
    main()
