"""A service with an outbox and an inbox killed with SIGKILL at random points:
before its transaction commits, between the commit and the relay's publish, and
during the publish, many times, on SQLite and PostgreSQL.

Afterwards every deposit took effect exactly once, every event a committed
transaction enqueued reached the transport (at least once, each copy identical),
and no event of a transaction that did not commit was published.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import msgspec
import pytest
from _reading import read_everything

from nervus import Event
from nervus.runtime._outgoing import encode
from nervus.storage import EventStore, store_from_url
from nervus.transports import Delivery, OutgoingMessage, Transport, from_url

CHILD = Path(__file__).with_name("outbox_crash_child.py")
ROOT = Path(__file__).resolve().parents[2]
REQUESTS, DEPOSITED = "outboxcrash.requests", "outboxcrash.deposited"
POINTS = {"before-commit": 0.03, "after-commit": 0.03, "publish": 0.15}
HITS = 4  # self-kills wanted at each point
EXTERNAL_KILLS = 4  # SIGKILLs sent by the test at random moments
ACCOUNTS = 8
WAVE = 40  # deposits published whenever fewer than this wait
CHAOS_SECONDS, DRAIN_SECONDS = 45.0, 45.0


@pytest.fixture(
    params=[
        pytest.param(("sqlite", "sqlite"), marks=pytest.mark.slow, id="sqlite-store-sqlite-log"),
        pytest.param(
            ("postgres", "sqlite"),
            marks=[pytest.mark.slow, pytest.mark.postgres],
            id="postgres-store-sqlite-log",
        ),
        pytest.param(
            ("postgres", "postgres"),
            marks=[pytest.mark.slow, pytest.mark.postgres],
            id="postgres-store-postgres-log",
        ),
    ]
)
async def urls(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """(store URL, transport URL), each fresh."""
    store_kind, log_kind = request.param
    schemas = []
    postgres_url = request.getfixturevalue("postgres_url") if "postgres" in request.param else ""
    if store_kind == "sqlite":
        store = f"sqlite:///{tmp_path}/store.db"
    else:
        schemas.append(f"nervus_obcrash_{uuid.uuid4().hex[:12]}")
        store = f"{postgres_url}?schema={schemas[-1]}&poll_interval=0.2"
    if log_kind == "sqlite":
        log = f"sqlite:///{tmp_path}/log.db?partitions=4&lease_seconds=2"
    else:
        schemas.append(f"nervus_oblog_{uuid.uuid4().hex[:12]}")
        log = f"{postgres_url}?schema={schemas[-1]}&partitions=4&lease_seconds=2&poll_interval=0.2"
    yield store, log
    if schemas:
        conn = await asyncpg.connect(postgres_url)
        try:
            for schema in schemas:
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


class Child:
    """The ledger service in a process of its own, restarted after each death."""

    def __init__(self, store: str, transport: str, tmp: Path) -> None:
        self.args = [sys.executable, str(CHILD), store, transport, str(tmp / "kills.txt")]
        self.log = tmp / "ledger.log"
        self.kills_file = tmp / "kills.txt"
        self.kills_file.touch()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NERVUS_")}
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
        self.proc: subprocess.Popen[bytes] | None = None
        self.points: dict[str, float] = {}
        self.starts = 0
        self.external_kills = 0

    def start(self, points: dict[str, float]) -> None:
        self.points = points
        spec = ",".join(f"{p}={chance}" for p, chance in points.items())
        with open(self.log, "ab") as log:
            log.write(f"--- start {self.starts} with {spec or 'no crash points'}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.args, env={**self.env, "OUTBOX_CRASH_POINTS": spec}, stderr=log, cwd=ROOT
            )
        self.starts += 1

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.external_kills += 1

    def exited(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def hits(self) -> dict[str, list[str]]:
        """The nonces (or cut batches) of the self-kills, by point."""
        by_point: dict[str, list[str]] = defaultdict(list)
        for line in self.kills_file.read_text().splitlines():
            point, _, detail = line.partition(" ")
            by_point[point].append(detail)
        return by_point

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


async def prepare(store_url: str) -> None:
    async with store_from_url(store_url) as store, store.transaction() as tx:
        ns = tx.namespace
        await tx.execute(
            f"CREATE TABLE {ns}accounts (account TEXT PRIMARY KEY, cents INTEGER NOT NULL)"
        )
        await tx.execute(f"CREATE TABLE {ns}applied (request TEXT NOT NULL, nonce TEXT NOT NULL)")
        for n in range(ACCOUNTS):
            await tx.execute(f"INSERT INTO {ns}accounts VALUES (?, 0)", f"acct-{n}")


class Deposit(
    Event, type="outboxcrash.account.deposit-requested.v1", channel=REQUESTS, key="account"
):
    """What the driver publishes (the child declares the same type)."""

    request: str
    account: str
    cents: int


def deposit(n: int) -> tuple[str, OutgoingMessage]:
    """Deposit ``n``: ``n + 1`` cents to one of the accounts (amounts all differ, so
    an effect applied twice shows in the totals)."""
    event = Deposit(request=f"r-{n}", account=f"acct-{n % ACCOUNTS}", cents=n + 1)
    _, message = encode(event, source="/test/outbox-crash")
    return event.request, message


async def applied_count(store: EventStore) -> int:
    async with store.transaction() as tx:
        rows = await tx.fetch(f"SELECT count(DISTINCT request) FROM {tx.namespace}applied")
    return int(rows[0][0])  # type: ignore[call-overload]


async def test_sigkill_before_commit_after_commit_and_in_publish(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    store_url, transport_url = urls
    rng = random.Random(int(os.environ.get("NERVUS_TEST_SEED", "7331")))
    await prepare(store_url)
    child = Child(store_url, transport_url, tmp_path)
    sent: dict[str, OutgoingMessage] = {}  # request -> the message carrying it
    started = time.monotonic()

    def wanted() -> dict[str, float]:
        hits = child.hits()
        return {p: c for p, c in POINTS.items() if len(hits.get(p, ())) < HITS}

    transport = from_url(transport_url)
    await transport.connect()
    try:
        await transport.ensure_channel(REQUESTS)
        async with store_from_url(store_url) as store:
            child.start(wanted())
            kill_at = time.monotonic() + rng.uniform(1.0, 4.0)
            chaos_until = started + CHAOS_SECONDS
            while time.monotonic() < chaos_until:
                await asyncio.sleep(0.2)
                code = child.exited()
                if code is not None:  # it killed itself: start it again
                    assert code == -signal.SIGKILL, f"the child exited {code}: {child.tail()}"
                    child.start(wanted())
                elif child.external_kills < EXTERNAL_KILLS and time.monotonic() > kill_at:
                    child.kill()  # at a moment of the test's choosing
                    child.start(wanted())
                    kill_at = time.monotonic() + rng.uniform(1.0, 4.0)
                if len(sent) - await applied_count(store) < WAVE // 2:
                    await publish_wave(transport, sent)
                if not wanted() and child.external_kills >= EXTERNAL_KILLS:
                    break
            # no more crashes: the last process handles and publishes everything
            if child.points or child.exited() is not None:
                child.kill()
                child.start({})
            deadline = time.monotonic() + DRAIN_SECONDS
            while time.monotonic() < deadline:
                assert child.exited() is None, child.tail()
                if await applied_count(store) == len(sent) and not (await store.outbox_counts())[0]:
                    break
                await asyncio.sleep(0.2)
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
            assert child.proc.wait(30) == 0, child.tail()
            await check(store, transport_url, sent, child.hits())
    finally:
        await transport.close()
        if child.proc is not None and child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
    hits = child.hits()
    for point in POINTS:
        assert len(hits.get(point, ())) >= HITS, (point, dict(hits))
    assert child.external_kills >= EXTERNAL_KILLS
    print(
        f"{len(sent)} deposits, {child.starts} processes, self-kills "
        f"{ {p: len(v) for p, v in hits.items()} }, {child.external_kills} external kills, "
        f"{time.monotonic() - started:.1f} s"
    )


async def publish_wave(transport: Transport, sent: dict[str, OutgoingMessage]) -> None:
    wave = [deposit(n) for n in range(len(sent), len(sent) + WAVE)]
    await transport.publish(REQUESTS, [m for _, m in wave])
    sent.update(wave)


async def check(
    store: EventStore,
    transport_url: str,
    sent: dict[str, OutgoingMessage],
    hits: dict[str, list[str]],
) -> None:
    async with store.transaction() as tx:
        applied = await tx.fetch(f"SELECT request, nonce FROM {tx.namespace}applied")
        accounts = await tx.fetch(f"SELECT account, cents FROM {tx.namespace}accounts")
    # every deposit took effect exactly once
    per_request = Counter(str(r) for r, _ in applied)
    assert set(per_request) == set(sent), "a deposit never took effect"
    assert max(per_request.values()) == 1, "a deposit took effect twice"
    expected: Counter[str] = Counter()
    for message in sent.values():
        data = msgspec.json.decode(message.body)
        expected[data["account"]] += data["cents"]
    assert {str(a): int(c) for a, c in accounts} == dict(expected)  # type: ignore[call-overload]
    committed = {str(n): str(r) for r, n in applied}  # nonce -> request

    # every committed event reached the transport; copies of one id are identical
    copies: dict[str, list[Delivery]] = defaultdict(list)
    for d in await read_everything(transport_url, DEPOSITED, idle=1.0):
        copies[d.headers["ce_id"]].append(d)
    published: dict[str, str] = {}  # nonce -> event id
    for event_id, same in copies.items():
        first = same[0]
        for other in same[1:]:
            assert (other.key, other.body, other.headers) == (first.key, first.body, first.headers)
        data = msgspec.json.decode(first.body)
        nonce = data["nonce"]
        assert nonce not in published, "one transaction's event published under two ids"
        published[nonce] = event_id
        # no event of a transaction that did not commit
        assert nonce in committed, f"event {event_id} of an uncommitted transaction was published"
        request = committed[nonce]
        assert data["request"] == request
        assert first.headers["ce_causationid"] == sent[request].headers["ce_id"]
    assert set(published) == set(committed), "a committed event never reached the transport"
    # the transactions killed before their commit left nothing behind
    assert not set(hits.get("before-commit", ())) & set(committed)
    assert set(hits.get("after-commit", ())) <= set(committed)
    duplicates = sum(len(same) - 1 for same in copies.values())
    print(f"{len(published)} events published, {duplicates} published again (same id)")
