"""The broker benchmarks: nervus, the broker's raw Python client and FastStream on
the same server in the same run.

    python -m benchmarks.run --broker kafka|nats|redis|rabbitmq|postgres [--events N]

1. End-to-end throughput: one producer process publishes ``--events`` typed events,
   one consumer process in a group decodes and acknowledges each; events per second
   from the first publish to the last acknowledgement. For nervus (``from_url``), the
   raw client, and FastStream (``--faststream-events`` events, one round); ratios
   nervus / raw and nervus / FastStream.
2. Latency at ``--rate`` events/s for ``--duration`` s, stamped in the payload and
   read at the consumer: nervus and the raw client.

Every figure runs on fresh names (topic, stream, queue, schema, group) that carry the
run's token, and everything carrying it is removed afterwards. Every process has a
deadline; a figure that fails or times out reports its error instead of a number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from importlib import metadata
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULT_URLS = {
    "kafka": "kafka://127.0.0.1:9092",
    "nats": "nats://127.0.0.1:4222",
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "postgres": "postgresql://nervus:nervus@127.0.0.1:5432/nervus",
}
BROKERS = sorted(DEFAULT_URLS)

# The nervus URL option that scopes everything a transport creates besides the
# channel (key-value buckets, group keys, tables) to one run's name.
SCOPE_OPTION = {"nats": "namespace", "redis": "prefix", "postgres": "schema"}

RAW_EVENTS = (
    "per event: the typed event encoded with msgspec, and a dict of the CloudEvents "
    "headers nervus sends (ce_specversion, ce_id, ce_type, ce_source, ce_time, "
    "content-type, ce_correlationid, ce_partitionkey) with ce_id = str(uuid.uuid4()) "
    "and ce_time = datetime.now(UTC).isoformat(); the consumer reads each "
    "message's headers, takes ce_type and decodes the body into that type's class "
    "(one dict lookup)"
)
RAW_CLIENTS = {
    "kafka": (
        "confluent-kafka",
        "Producer (defaults, acks=all): produce with the headers dict and a delivery "
        "callback per event, poll(0), flush at the end; Consumer without auto-commit: "
        "poll, consume what is already fetched, dict(message.headers()) per event, a "
        "synchronous commit per batch",
    ),
    "nats": (
        "nats-py",
        "JetStream: js.publish with the headers (waits for the ack) per event, the "
        "publishes of a batch awaited together; pull subscription: fetch(n), "
        "msg.headers, msg.ack() per event",
    ),
    "redis": (
        "redis",
        "redis.asyncio Streams: XADD per event (fields key, headers as JSON, body) in a "
        "pipeline per batch; XREADGROUP COUNT n, the headers decoded from JSON per "
        "entry, one XACK per batch",
    ),
    "rabbitmq": (
        "aio-pika",
        "publisher confirms, persistent messages with the headers to a durable queue, "
        "the publishes of a batch awaited together; consumer with prefetch = fetch, "
        "message.headers and ack per event",
    ),
    "postgres": (
        "psycopg",
        "psycopg AsyncConnection: one multi-row INSERT (key, headers as JSON, body) per "
        "batch; SELECT id, headers, body ... WHERE id > last ORDER BY id LIMIT n, the "
        "headers decoded from JSON per row, and an UPDATE of the group's offset per "
        "batch, polling every 2 ms when idle",
    ),
}
FASTSTREAM_HOW = (
    "FastStream with its defaults: a pydantic model per event, publisher.publish per "
    "event awaited one after the other; a subscriber whose handler gets the decoded model"
)
FASTSTREAM_SETUP = {
    "kafka": "aiokafka; topic created with the same partitions; group, auto_offset_reset=earliest",
    "nats": "JetStream push subscription with a durable consumer; publisher with stream=",
    "redis": "Redis Streams subscriber with a consumer group (StreamSub group=, last_id=0)",
    "rabbitmq": "durable queue, default exchange; publisher confirms on, persist=False (default)",
}
FASTSTREAM_LOGGING = {
    "on": "default logging: an INFO line per message received and per message processed",
    "off": "logging turned off (logger=None): no line per message",
}

TARGET_RATIO_TO_RAW = 0.8
TARGET_RATIO_TO_FASTSTREAM = 4.0
TARGET_EVENTS_PER_S = {"kafka": 50_000}
REFERENCE_EVENTS_PER_S = {
    "raw": {"nats": 13_000, "redis": 24_000},
    "faststream": {"nats": 5_900, "redis": 2_100, "rabbitmq": 2_100},
}

LEFTOVERS = re.compile(r"bench[_-][0-9a-f]{8}[_-]")
"""The names every run's resources carry: ``bench_<token>_<figure>``."""

MANAGEMENT_PORT = 15672  # RabbitMQ's management API, used to find what a run created


class FigureFailed(Exception):
    """One figure could not be measured; its message goes into the JSON."""


class Worker:
    """A benchmark process speaking JSON lines, every read bounded in time."""

    def __init__(self, arguments: list[str]) -> None:
        self.role = " ".join(arguments[:3])
        self.stderr: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._broker_workers", *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for text in self.process.stdout:
            self.lines.put(text)
        self.lines.put("")

    def line(self, timeout: float) -> dict[str, Any]:
        try:
            text = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise FigureFailed(f"{self.role}: no answer in {timeout:g} s") from None
        if not text:
            code = self.process.wait(10)
            raise FigureFailed(f"{self.role} ended (exit code {code}){self._stderr_tail()}")
        result: dict[str, Any] = json.loads(text)
        if "error" in result:
            raise FigureFailed(f"{self.role}: {result['error']}{self._stderr_tail()}")
        return result

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        """Let the process end by itself for a moment, then kill it."""
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.stderr.close()

    def _stderr_tail(self) -> str:
        with contextlib.suppress(ValueError, OSError):
            self.stderr.seek(0)
            lines = [line for line in self.stderr.read().splitlines() if line.strip()]
            if lines:
                return " | stderr: " + " / ".join(lines[-3:])
        return ""


def pair(
    client: str,
    broker: str,
    url: str,
    name: str,
    options: list[str],
    latency: bool,
    deadline: float,
) -> dict[str, Any]:
    """Start the consumer, then the producer, then give the cue; return both results."""
    prefix = "latency-" if latency else ""
    common = [client, broker, url, name, *options, "--deadline", str(deadline)]
    wait = deadline + 20
    workers: list[Worker] = []
    try:
        consuming = Worker([f"{prefix}consumer", *common])
        workers.append(consuming)
        consumer_ready = consuming.line(wait)
        producing = Worker([f"{prefix}producer", *common])
        workers.append(producing)
        producer_ready = producing.line(wait)
        producing.go()
        produced = producing.line(wait)
        consumed = consuming.line(wait)
    finally:
        for worker in workers:
            worker.stop()
    produced["cpu_s"] -= producer_ready["cpu_s"]
    consumed["cpu_s"] -= consumer_ready["cpu_s"]
    return {"producer": produced, "consumer": consumed}


def throughput_figure(figures: dict[str, Any], events: int) -> dict[str, Any]:
    producer, consumer = figures["producer"], figures["consumer"]
    elapsed = float(consumer["last_ack"]) - float(producer["first_publish"])
    publish_s = float(producer["last_publish"]) - float(producer["first_publish"])
    return {
        "events_per_s": events / elapsed,
        "publish_events_per_s": events / publish_s,
        "elapsed_s": elapsed,
        "cpu_us_per_event": {
            role: round(figures[role]["cpu_s"] / events * 1e6, 1)
            for role in ("producer", "consumer")
        },
        "duplicates": consumer["duplicates"],
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class BrokerRun:
    """One ``--broker`` run: names, URLs, figures and the cleanup after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.broker: str = args.broker
        self.url: str = args.url or DEFAULT_URLS[self.broker]
        self.token = secrets.token_hex(4)
        self.cleanup: dict[str, list[str]] = {"removed": [], "errors": []}

    def name(self, figure: str) -> str:
        """A fresh name for one figure, valid as a Kafka topic, JetStream stream and
        namespace, Redis key, RabbitMQ queue and PostgreSQL schema."""
        return f"bench_{self.token}_{figure}"

    def nervus_url(self, name: str) -> str:
        parts = urlsplit(self.url)
        query = dict(parse_qsl(parts.query))
        query.setdefault("partitions", str(self.args.partitions))
        scope = SCOPE_OPTION.get(self.broker)
        if scope is not None:
            query[scope] = name.replace("_", "-") if self.broker == "nats" else name
        query.update(parse_qsl(self.args.options))
        return urlunsplit(parts._replace(query=urlencode(query)))

    def options(self, events: int) -> list[str]:
        a = self.args
        return [
            "--events", str(events),
            "--batch", str(a.batch),
            "--in-flight", str(a.in_flight),
            "--fetch", str(a.fetch),
            "--partitions", str(a.partitions),
            "--rate", str(a.rate),
            "--duration", str(a.duration),
            "--faststream-logging", a.faststream_logging,
        ]  # fmt: skip

    def deadline(self, events: int, slowest_rate: float) -> float:
        return max(60.0, events / slowest_rate)

    def measure(
        self, client: str, figure: str, events: int, latency: bool, slowest_rate: float
    ) -> dict[str, Any]:
        name = self.name(figure)
        url = self.nervus_url(name) if client == "nervus" else self.url
        try:
            return pair(
                client,
                self.broker,
                url,
                name,
                self.options(events),
                latency,
                self.deadline(events, slowest_rate),
            )
        finally:
            self.clean(name)

    # -- figures ---------------------------------------------------------------------------

    def throughput(self) -> dict[str, Any]:
        a = self.args
        rounds: dict[str, list[dict[str, Any]]] = {"nervus": [], "raw": []}
        errors: dict[str, list[str]] = {"nervus": [], "raw": []}
        for n in range(a.repeat):
            for client in ("nervus", "raw"):
                # A failed round may be a passing hiccup; a second failure ends the
                # client's rounds, so a broken transport does not hold the run up.
                if len(errors[client]) >= 2:
                    continue
                try:
                    figures = self.measure(client, f"{client}{n}", a.events, False, 500)
                    rounds[client].append(throughput_figure(figures, a.events))
                except FigureFailed as exc:
                    errors[client].append(f"round {n + 1}: {exc}")
        result: dict[str, Any] = {"events": a.events, "rounds": a.repeat}
        for client in ("nervus", "raw"):
            result[client] = summary(rounds[client], errors[client])
        package, how = RAW_CLIENTS[self.broker]
        result["raw"]["client"] = f"{package} {version(package)}"
        result["raw"]["how"] = how
        result["raw"]["per_event"] = RAW_EVENTS
        reference = REFERENCE_EVENTS_PER_S["raw"].get(self.broker)
        if reference is not None:
            result["raw"]["reference_events_per_s"] = reference
        return result

    def faststream(self) -> dict[str, Any]:
        if self.broker == "postgres":
            return {"skipped": "FastStream has no PostgreSQL broker; no figure"}
        events = min(self.args.faststream_events, self.args.events)
        result: dict[str, Any] = {
            "library": f"faststream {version('faststream')}",
            "how": FASTSTREAM_HOW,
            "setup": FASTSTREAM_SETUP[self.broker],
            "logging": FASTSTREAM_LOGGING[self.args.faststream_logging],
            "events": events,
            "rounds": 1,
        }
        reference = REFERENCE_EVENTS_PER_S["faststream"].get(self.broker)
        if reference is not None:
            result["reference_events_per_s"] = reference
        try:
            figures = self.measure("faststream", "faststream", events, False, 40)
            result.update(summary([throughput_figure(figures, events)], []))
        except FigureFailed as exc:
            result["error"] = str(exc)
        return result

    def latency(self) -> dict[str, Any]:
        a = self.args
        result: dict[str, Any] = {"rate_per_s": a.rate, "duration_s": a.duration}
        events = int(a.rate * a.duration)
        for client in ("nervus", "raw"):
            try:
                figures = self.measure(client, f"latency_{client}", events, True, a.rate / 2)
            except FigureFailed as exc:
                result[client] = {"error": str(exc)}
                continue
            delays_ms = [d * 1000 for d in figures["consumer"]["delays"]]
            publish_ms = [d * 1000 for d in figures["producer"]["publish_s"]]
            result[client] = {
                "events": len(delays_ms),
                "p50_ms": round(percentile(delays_ms, 0.50), 2),
                "p90_ms": round(percentile(delays_ms, 0.90), 2),
                "p99_ms": round(percentile(delays_ms, 0.99), 2),
                "max_ms": round(max(delays_ms), 2),
                "publish_call_p50_ms": round(percentile(publish_ms, 0.50), 2),
                "publish_call_p99_ms": round(percentile(publish_ms, 0.99), 2),
            }
        return result

    # -- cleanup ---------------------------------------------------------------------------

    def clean(self, name: str, pattern: re.Pattern[str] | None = None) -> None:
        """Remove everything whose name contains ``name`` (spelt with ``_`` or ``-``),
        or matches ``pattern``; a server still settling what a process left behind
        gets two more tries."""
        if pattern is None:
            pattern = re.compile(re.escape(name).replace("_", "[_-]"))
        cleaner = CLEANERS[self.broker]
        for attempt in range(3):
            try:
                removed = cleaner(self.url, pattern)
            except Exception as exc:
                if attempt == 2:
                    self.cleanup["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
                else:
                    time.sleep(1.0)
            else:
                self.cleanup["removed"].extend(removed)
                return

    def sweep(self) -> None:
        """The last cleanup: anything of this run a figure's own cleanup missed."""
        self.clean(f"bench_{self.token}")

    def remove_leftovers(self) -> None:
        """Remove what earlier runs left (a run killed, or whose server went away)."""
        self.clean("leftovers of earlier runs", LEFTOVERS)


def summary(rounds: list[dict[str, Any]], errors: list[str]) -> dict[str, Any]:
    """Medians over the rounds measured; the error of each failed round."""
    result: dict[str, Any] = {}
    if errors:
        result["error"] = errors[0] if len(errors) == 1 else errors
    if not rounds:
        return result
    result.update(
        {
            "events_per_s": round(statistics.median(r["events_per_s"] for r in rounds)),
            "events_per_s_each_round": [round(r["events_per_s"]) for r in rounds],
            "publish_events_per_s": round(
                statistics.median(r["publish_events_per_s"] for r in rounds)
            ),
            "cpu_us_per_event": {
                role: statistics.median(r["cpu_us_per_event"][role] for r in rounds)
                for role in ("producer", "consumer")
            },
            "duplicates": sum(r["duplicates"] for r in rounds),
        }
    )
    return result


def ratios(broker: str, document: dict[str, Any]) -> dict[str, Any]:
    """nervus / raw and nervus / FastStream, against their targets (reported, not asserted)."""
    figures = document.get("throughput", {})
    nervus = figures.get("nervus", {}).get("events_per_s")
    raw = figures.get("raw", {}).get("events_per_s")
    fast = document.get("faststream", {}).get("events_per_s")
    result: dict[str, Any] = {}
    if nervus is not None and raw is not None:
        ratio = nervus / raw
        result["nervus_to_raw"] = round(ratio, 3)
        result["target_nervus_to_raw"] = TARGET_RATIO_TO_RAW
        result["meets_target_nervus_to_raw"] = ratio >= TARGET_RATIO_TO_RAW
    if nervus is not None and fast is not None:
        ratio = nervus / fast
        result["nervus_to_faststream"] = round(ratio, 2)
        result["target_nervus_to_faststream"] = TARGET_RATIO_TO_FASTSTREAM
        result["meets_target_nervus_to_faststream"] = ratio >= TARGET_RATIO_TO_FASTSTREAM
    target = TARGET_EVENTS_PER_S.get(broker)
    if nervus is not None and target is not None:
        result["target_nervus_events_per_s"] = target
        result["nervus_ratio_to_target"] = round(nervus / target, 3)
        result["meets_target_nervus_events_per_s"] = nervus >= target
    return result


# -- cleaners: each removes what carries a name and returns what it removed ---------------


def clean_kafka(url: str, names: re.Pattern[str]) -> list[str]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": urlsplit(url).netloc})
    removed: list[str] = []
    listed = admin.list_consumer_groups(request_timeout=10).result(15)
    groups = [g.group_id for g in listed.valid if names.search(g.group_id)]
    if groups:
        for group, future in admin.delete_consumer_groups(groups, request_timeout=10).items():
            future.result(15)
            removed.append(f"kafka group {group}")
    topics = [t for t in admin.list_topics(timeout=10).topics if names.search(t)]
    if topics:
        for topic, future in admin.delete_topics(topics, operation_timeout=10).items():
            future.result(15)
            removed.append(f"kafka topic {topic}")
    return removed


def clean_nats(url: str, names: re.Pattern[str]) -> list[str]:
    async def clean() -> list[str]:
        import nats

        nc = await nats.connect(url, connect_timeout=5)
        try:
            js = nc.jetstream()
            removed = []
            for info in await js.streams_info():
                stream = info.config.name
                if stream and names.search(stream):
                    await js.delete_stream(stream)
                    removed.append(f"jetstream stream {stream}")
            return removed
        finally:
            await nc.close()

    return asyncio.run(asyncio.wait_for(clean(), 30))


def clean_redis(url: str, names: re.Pattern[str]) -> list[str]:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        removed = []
        for key in client.scan_iter(match="*bench*", count=1000):
            if names.search(key.decode(errors="replace")):
                client.delete(key)
                removed.append(f"redis key {key.decode(errors='replace')}")
        return removed
    finally:
        client.close()


def clean_rabbitmq(url: str, names: re.Pattern[str]) -> list[str]:
    parts = urlsplit(url)
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    base = f"http://{parts.hostname}:{MANAGEMENT_PORT}/api"
    credentials = f"{parts.username or 'guest'}:{parts.password or 'guest'}"
    auth = "Basic " + b64encode(urllib.parse.unquote(credentials).encode()).decode()
    quoted_vhost = urllib.parse.quote(vhost, safe="")

    def call(method: str, path: str) -> Any:
        request = urllib.request.Request(base + path, method=method)
        request.add_header("Authorization", auth)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    removed = []
    for kind in ("queues", "exchanges"):
        for entry in call("GET", f"/{kind}/{quoted_vhost}?columns=name"):
            name = entry["name"]
            if names.search(name):
                call("DELETE", f"/{kind}/{quoted_vhost}/{urllib.parse.quote(name, safe='')}")
                removed.append(f"rabbitmq {kind[:-1]} {name}")
    return removed


def clean_postgres(url: str, names: re.Pattern[str]) -> list[str]:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        schemas = [
            row[0]
            for row in conn.execute("SELECT nspname FROM pg_namespace").fetchall()
            if names.search(row[0])
        ]
        for schema in schemas:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return [f"postgres schema {s}" for s in schemas]


CLEANERS: dict[str, Callable[[str, re.Pattern[str]], list[str]]] = {
    "kafka": clean_kafka,
    "nats": clean_nats,
    "redis": clean_redis,
    "rabbitmq": clean_rabbitmq,
    "postgres": clean_postgres,
}


def version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def run_broker(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one broker; the JSON document ``benchmarks.run`` prints."""
    from benchmarks._event import make_event, to_message
    from benchmarks._machine import machine

    run = BrokerRun(args)
    started = time.monotonic()
    package = RAW_CLIENTS[run.broker][0]
    document: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "broker": run.broker,
            "url": redact(run.url),
            "nervus_url_example": redact(run.nervus_url(run.name("nervus0"))),
            "run_token": run.token,
            "events": args.events,
            "faststream_events": min(args.faststream_events, args.events),
            "rounds": args.repeat,
            "partitions": args.partitions,
            "publish_batch": args.batch,
            "publish_calls_in_flight": args.in_flight,
            "fetch_batch": args.fetch,
            "event_body_bytes": len(to_message(make_event(0)).body),
            "latency_rate_per_s": args.rate,
            "latency_duration_s": args.duration,
            "clients": {
                "nervus": version("nervus"),
                package: version(package),
                "faststream": version("faststream"),
            },
        },
    }
    if args.remove_leftovers:
        run.remove_leftovers()
    if args.only in (None, "throughput"):
        document["throughput"] = run.throughput()
    if args.only in (None, "peer"):
        document["faststream"] = run.faststream()
    if args.only in (None, "throughput", "peer"):
        document["ratios"] = ratios(run.broker, document)
    if args.only in (None, "latency"):
        document["latency"] = run.latency()
    run.sweep()
    document["cleanup"] = run.cleanup
    document["machine"]["load_average_1m"] = round(os.getloadavg()[0], 2)
    document["machine"]["run_seconds"] = round(time.monotonic() - started, 1)
    return document
