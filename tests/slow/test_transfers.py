"""Exactly-once money transfers: ``transfers`` debits and publishes ``Debited``
through its outbox, ``accounts`` credits, both with inboxes, each in a process of
its own beside two ``nervus relay`` processes (the services run with
``NERVUS_RELAY=0``). The test issues transfers between accounts while killing
consumers and relays with SIGKILL at random; at the end every balance is what the
transfers make it, the total is conserved, and the inboxes report the duplicates
they suppressed. On the embedded default (SQLite stores and log) and on Kafka with
PostgreSQL stores.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from nervus import Event
from nervus.runtime._outgoing import encode
from nervus.storage import EventStore, store_from_url
from nervus.transports import Delivery, OutgoingMessage, Transport, from_url

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHILD = "tests.slow.transfers_child"
ACCOUNTS, INITIAL = 10, 100_000  # cents per account at the start
TRANSFERS = 400
KILLS = ["transfers"] * 4 + ["accounts"] * 4 + ["relay-0", "relay-1"]
KILL_PAUSE = (1.0, 2.5)  # seconds between two kills
LATE_DUPLICATES = 5  # messages of each service delivered again after the kills
START_SECONDS, DRAIN_SECONDS, STOP_SECONDS = 60.0, 60.0, 30.0


class TransferRequested(Event, type="transferstest.money.transfer-requested.v1", key="source"):
    """What the test publishes (``transfers_child`` declares the same type)."""

    transfer_id: str
    source: str
    target: str
    cents: int


@dataclass(frozen=True)
class Setup:
    transport: str
    stores: dict[str, str]  # service -> its store
    run: str  # this run's channel and group prefix

    @property
    def requests(self) -> str:
        return f"{self.run}.requests"

    @property
    def debited(self) -> str:
        return f"{self.run}.debited"


@pytest.fixture(
    params=[
        pytest.param("embedded"),
        pytest.param(
            "kafka-postgres",
            marks=[pytest.mark.integration, pytest.mark.kafka, pytest.mark.postgres],
        ),
    ]
)
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    run = f"xfer-{uuid.uuid4().hex[:10]}"
    if request.param == "embedded":
        yield Setup(
            transport=f"sqlite:///{tmp_path}/log.db?partitions=4&lease_seconds=2",
            stores={name: f"sqlite:///{tmp_path}/{name}.db" for name in ("transfers", "accounts")},
            run=run,
        )
        return
    kafka_url: str = request.getfixturevalue("kafka_url")
    postgres_url: str = request.getfixturevalue("postgres_url")
    schemas = {name: f"nervus_{name}_{uuid.uuid4().hex[:10]}" for name in ("transfers", "accounts")}
    yield Setup(
        transport=f"{kafka_url}?partitions=4&session_timeout=6&heartbeat_interval=0.5"
        "&linger_ms=1&commit_interval=0.02",
        stores={
            name: f"{postgres_url}?schema={s}&poll_interval=0.2" for name, s in schemas.items()
        },
        run=run,
    )
    conn = await asyncpg.connect(postgres_url)
    try:
        for schema in schemas.values():
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


class Fleet:
    """The two services and two relays, each a process restarted after each kill."""

    NAMES = ("transfers", "accounts", "relay-0", "relay-1")

    def __init__(self, setup: Setup, logs: Path) -> None:
        self.setup = setup
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: Counter[str] = Counter()
        self.offsets: dict[str, int] = {}  # where each process's log begins
        self.kills: Counter[str] = Counter()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NERVUS_")}
        env.update(
            NERVUS_TRANSPORT=setup.transport,
            NERVUS_RELAY="0",
            NERVUS_MAX_ATTEMPTS="1000",  # deliveries cut short by a kill are no failures
            NERVUS_BACKOFF_INITIAL="0.05",
            NERVUS_BACKOFF_MAX="0.5",
            NERVUS_SHUTDOWN_TIMEOUT="5",
            TRANSFERS_RUN=setup.run,
        )
        self.env = env

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str) -> None:
        if name.startswith("relay"):
            args = ["relay"]
            store = self.setup.stores["transfers"]  # the store whose outbox carries Debited
        else:
            args = ["run", f"{CHILD}:{name}"]
            store = self.setup.stores[name]
        with open(self.log(name), "ab") as log:
            self.offsets[name] = log.tell()
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "nervus", *args],
                env={**self.env, "NERVUS_STORE": store},
                stderr=log,
                cwd=ROOT,
            )
        self.starts[name] += 1

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        assert proc.poll() is None, self.failure()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.kills[name] += 1

    async def started(self, within: float) -> None:
        """Wait until every process started last says it is consuming (or relaying)."""
        deadline = time.monotonic() + within
        waiting = list(self.procs)
        while waiting and time.monotonic() < deadline:
            assert self.failure() is None, self.failure()
            waiting = [name for name in waiting if not self._started(name)]
            await asyncio.sleep(0.1)
        assert not waiting, f"not started within {within} s: {self.failure(every=True)}"

    def _started(self, name: str) -> bool:
        service = "relay" if name.startswith("relay") else name
        with open(self.log(name), "rb") as log:
            log.seek(self.offsets[name])
            return f"service '{service}' started".encode() in log.read()

    def failure(self, *, every: bool = False) -> str | None:
        """The logs of the processes that exited by themselves (or of all, with ``every``)."""
        logs = []
        for name, proc in self.procs.items():
            if every or proc.poll() is not None:
                text = self.log(name).read_text(errors="replace")
                logs.append(f"{name} exited {proc.poll()}:\n{text[-2000:]}")
        return "\n".join(logs) or None

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes

    def suppressed(self, name: str) -> int:
        """Redelivered messages the inbox of ``name`` reported suppressing when it stopped."""
        text = self.log(name).read_text(errors="replace")
        return sum(int(n) for n in re.findall(r"the inbox suppressed (\d+)", text))


async def prepare(setup: Setup) -> None:
    async with store_from_url(setup.stores["transfers"]) as store, store.transaction() as tx:
        ns = tx.namespace
        await tx.execute(
            f"CREATE TABLE {ns}balances (account TEXT PRIMARY KEY, cents INTEGER NOT NULL)"
        )
        await tx.execute(
            f"CREATE TABLE {ns}debits (transfer_id TEXT NOT NULL, account TEXT NOT NULL, "
            "cents INTEGER NOT NULL)"
        )
        for n in range(ACCOUNTS):
            await tx.execute(f"INSERT INTO {ns}balances VALUES (?, ?)", f"acct-{n}", INITIAL)
    async with store_from_url(setup.stores["accounts"]) as store, store.transaction() as tx:
        ns = tx.namespace
        await tx.execute(
            f"CREATE TABLE {ns}credits (account TEXT PRIMARY KEY, cents INTEGER NOT NULL)"
        )
        await tx.execute(
            f"CREATE TABLE {ns}ledger (transfer_id TEXT NOT NULL, account TEXT NOT NULL, "
            "cents INTEGER NOT NULL)"
        )
        for n in range(ACCOUNTS):
            await tx.execute(f"INSERT INTO {ns}credits VALUES (?, 0)", f"acct-{n}")


class Driver:
    """Publishes transfers (and copies of messages already delivered) for the test."""

    def __init__(self, setup: Setup, transport: Transport, rng: random.Random) -> None:
        self.setup = setup
        self.transport = transport
        self.rng = rng
        self.issued: dict[str, TransferRequested] = {}
        self.messages: dict[str, OutgoingMessage] = {}
        self.copies = 0  # messages published a second time

    def transfer(self, source: str | None = None, target: str | None = None) -> OutgoingMessage:
        accounts = [f"acct-{n}" for n in range(ACCOUNTS)]
        source = source or self.rng.choice(accounts)
        target = target or self.rng.choice([a for a in accounts if a != source])
        transfer = TransferRequested(
            transfer_id=f"t-{len(self.issued)}",
            source=source,
            target=target,
            cents=self.rng.randint(1, 500),
        )
        _, message = encode(transfer, source="/test/transfers")
        self.issued[transfer.transfer_id] = transfer
        self.messages[transfer.transfer_id] = message
        return message

    async def issue(self, count: int) -> None:
        batch = [self.transfer() for _ in range(count)]
        if len(self.messages) > count and self.rng.random() < 0.5:
            batch.append(self.messages[self.rng.choice(list(self.messages))])  # once more
            self.copies += 1
        await self.transport.publish(self.setup.requests, batch)

    async def late_duplicates(self) -> None:
        """Deliver ``LATE_DUPLICATES`` handled requests and debits again, each followed
        on its partition by a new transfer of the same key: once those new transfers
        took effect, the services have met every copy."""
        debits = await read_some(self.setup.transport, self.setup.debited, LATE_DUPLICATES)
        requests = self.rng.sample(sorted(self.messages), LATE_DUPLICATES)
        again = [self.messages[t] for t in requests]
        await self.transport.publish(self.setup.debited, [copy(d) for d in debits])
        await self.transport.publish(self.setup.requests, again)
        self.copies += len(debits) + len(again)
        followers = [
            self.transfer(self.issued[t].source, str(d.key))
            for t, d in zip(requests, debits, strict=True)
        ]
        await self.transport.publish(self.setup.requests, followers)


def copy(d: Delivery) -> OutgoingMessage:
    return OutgoingMessage(key=d.key, headers=dict(d.headers), body=d.body)


async def read_some(url: str, channel: str, count: int, within: float = 30.0) -> list[Delivery]:
    """``count`` distinct messages of ``channel``, read by a group of its own."""
    transport = from_url(url)
    await transport.connect()
    got: dict[str, Delivery] = {}
    try:
        sub = await transport.subscribe([channel], f"copier-{uuid.uuid4().hex[:6]}")
        async with asyncio.timeout(within):
            while len(got) < count:
                for d in await sub.fetch(100, 0.5):
                    got.setdefault(d.headers["ce_id"], d)
    finally:
        await transport.close()
    return list(got.values())[:count]


async def count_rows(store: EventStore, table: str) -> int:
    async with store.transaction() as tx:
        rows = await tx.fetch(f"SELECT count(DISTINCT transfer_id) FROM {tx.namespace}{table}")
    return int(rows[0][0])  # type: ignore[call-overload]


async def drained(debiting: EventStore, crediting: EventStore, transfers: int) -> bool:
    """Whether every transfer was debited and credited and the outbox marked sent,
    waiting up to DRAIN_SECONDS."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        if (
            await count_rows(debiting, "debits") == transfers
            and await count_rows(crediting, "ledger") == transfers
            and (await debiting.outbox_counts())[0] == 0
        ):
            return True
        await asyncio.sleep(0.3)
    return False


async def test_transfers_end_with_every_balance_right(setup: Setup, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("NERVUS_TEST_SEED", "2024")))
    began = time.monotonic()
    await prepare(setup)
    # connected before the processes start: a store's connect creates its tables
    debiting = store_from_url(setup.stores["transfers"])
    crediting = store_from_url(setup.stores["accounts"])
    await debiting.connect()
    await crediting.connect()
    transport = from_url(setup.transport)
    await transport.connect()
    fleet = Fleet(setup, tmp_path)
    driver = Driver(setup, transport, rng)
    try:
        for channel in (setup.requests, setup.debited):
            await transport.ensure_channel(channel)
        for name in Fleet.NAMES:
            fleet.start(name)
        await fleet.started(START_SECONDS)
        victims = rng.sample(KILLS, len(KILLS))
        wave = TRANSFERS // (len(KILLS) * 4)
        for victim in victims:  # transfers flow while processes die at random
            pause_until = time.monotonic() + rng.uniform(*KILL_PAUSE)
            while time.monotonic() < pause_until:
                if len(driver.issued) < TRANSFERS:
                    await driver.issue(min(wave, TRANSFERS - len(driver.issued)))
                await asyncio.sleep(0.25)
            assert fleet.failure() is None, fleet.failure()
            fleet.kill(victim)
            fleet.start(victim)
        if len(driver.issued) < TRANSFERS:
            await driver.issue(TRANSFERS - len(driver.issued))
        await fleet.started(START_SECONDS)  # no more kills
        await driver.late_duplicates()
        transfers = len(driver.issued)
        assert await drained(debiting, crediting, transfers), fleet.failure(every=True)
        assert fleet.failure() is None, fleet.failure()
        codes = fleet.stop()
        assert set(codes.values()) == {0}, (codes, fleet.failure(every=True))
        await check(debiting, crediting, driver.issued)
    finally:
        await transport.close()
        fleet.stop()
        await debiting.close()
        await crediting.close()
    suppressed = {name: fleet.suppressed(name) for name in ("transfers", "accounts")}
    assert suppressed["transfers"] >= LATE_DUPLICATES, suppressed
    assert suppressed["accounts"] >= LATE_DUPLICATES, suppressed
    assert fleet.kills == Counter(KILLS)
    print(
        f"{len(driver.issued)} transfers, {driver.copies} published twice, kills "
        f"{dict(fleet.kills)}, duplicates suppressed at the last stop {suppressed}, "
        f"{time.monotonic() - began:.1f} s"
    )


async def check(
    debiting: EventStore, crediting: EventStore, issued: dict[str, TransferRequested]
) -> None:
    async with debiting.transaction() as tx:
        ns = tx.namespace
        balances = dict(await tx.fetch(f"SELECT account, cents FROM {ns}balances"))
        debits = await tx.fetch(f"SELECT transfer_id, account, cents FROM {ns}debits")
    assert await debiting.outbox_counts() == (0, len(issued)), "an outbox message is unsent"
    assert await debiting.outbox_dead_letters() == []
    async with crediting.transaction() as tx:
        ns = tx.namespace
        credits = dict(await tx.fetch(f"SELECT account, cents FROM {ns}credits"))
        ledger = await tx.fetch(f"SELECT transfer_id, account, cents FROM {ns}ledger")
    for rows, side, what in ((debits, "source", "debited"), (ledger, "target", "credited")):
        times = Counter(str(t) for t, _, _ in rows)
        assert set(times) == set(issued), f"a transfer was never {what}"
        assert max(times.values()) == 1, f"a transfer was {what} twice: {times.most_common(3)}"
        for transfer_id, account, cents in rows:
            transfer = issued[str(transfer_id)]
            assert (account, cents) == (getattr(transfer, side), transfer.cents)
    expected = Counter({f"acct-{n}": INITIAL for n in range(ACCOUNTS)})
    for transfer in issued.values():
        expected[transfer.source] -= transfer.cents
        expected[transfer.target] += transfer.cents
    held = {str(a): int(balances[a]) + int(credits[a]) for a in balances}  # type: ignore[call-overload]
    assert held == dict(expected)
    assert sum(held.values()) == ACCOUNTS * INITIAL
