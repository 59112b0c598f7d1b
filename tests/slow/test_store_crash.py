"""Appenders and a projection killed with SIGKILL at random points, on SQLite and
PostgreSQL: afterwards no event is missing or doubled in the log, and the read
model equals the fold of the log."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest

from nervus.domain import projection_statuses
from nervus.storage import EventStore, store_from_url

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("store_crash_child.py")
ROOT = Path(__file__).resolve().parents[2]
APPENDERS, STREAMS, EVENTS = 3, 4, 60  # events per stream
CHAOS_SECONDS = 12.0
DEADLINE = 90.0


class Children:
    def __init__(self, url: str, logs: Path) -> None:
        self.url = url
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills: dict[str, int] = defaultdict(int)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}

    def start(self, name: str) -> None:
        if name == "projector":
            args = ["project", self.url]
        else:
            args = ["append", self.url, name, str(EVENTS), str(STREAMS)]
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(CHILD), *args], env=self.env, stderr=log
            )

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            self.kills[name] += 1

    def failed(self) -> list[str]:
        """Children that exited on their own with an error (not killed by us)."""
        out = []
        for name, proc in self.procs.items():
            code = proc.poll()
            if code not in (None, 0, -signal.SIGKILL):
                stderr = (self.logs / f"{name}.log").read_text(errors="replace")
                out.append(f"{name} exited {code}: {stderr[-2000:]}")
        return out

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


async def test_sigkill_at_random_loses_and_doubles_nothing(store_url: str, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("NERVUS_TEST_SEED", "4242")))
    appenders = [f"app{n}" for n in range(APPENDERS)]
    children = Children(store_url, tmp_path)
    for name in [*appenders, "projector"]:
        children.start(name)
    try:
        chaos_until = time.monotonic() + CHAOS_SECONDS
        while time.monotonic() < chaos_until:
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            victim = rng.choice([*appenders, "projector"])
            children.kill(victim)
            children.start(victim)
            assert not children.failed(), children.failed()
        # no more kills: the appenders finish, the projection catches up
        async with store_from_url(store_url) as store:
            deadline = time.monotonic() + DEADLINE
            for name in appenders:
                proc = children.procs[name]
                while proc.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert proc.poll() == 0, children.failed() or f"{name} did not finish"
            while time.monotonic() < deadline:
                statuses = await projection_statuses(store)
                if statuses and statuses[0].lag == 0:
                    break
                await asyncio.sleep(0.1)
            children.stop_all()
            await check(store)
    finally:
        children.stop_all()
    assert sum(children.kills.values()) >= 10, children.kills


async def check(store: EventStore) -> None:
    everything = await store.read_all(0, limit=1_000_000)
    ids = [e.id for e in everything]
    assert len(ids) == len(set(ids)), "an event id is stored twice"
    per_stream: dict[str, list[int]] = defaultdict(list)
    for recorded in everything:
        seq = msgspec.json.decode(recorded.envelope.data)["seq"]
        assert seq == recorded.version - 1, (recorded.stream_id, recorded.version, seq)
        per_stream[recorded.stream_id].append(seq)
    expected_streams = {f"app{a}-{s}" for a in range(APPENDERS) for s in range(STREAMS)}
    assert set(per_stream) == expected_streams
    for stream, seqs in per_stream.items():
        assert seqs == list(range(EVENTS)), f"{stream}: missing or doubled events"
    # the read model equals the fold of the log
    (status,) = await projection_statuses(store)
    assert status.lag == 0 and status.position == everything[-1].position
    async with store.transaction() as tx:
        rows = await tx.fetch(
            f"SELECT stream_id, events, seq_sum, last_seq FROM {store.namespace}totals"
        )
    folded = {stream: (len(seqs), sum(seqs), seqs[-1]) for stream, seqs in per_stream.items()}
    assert {str(r[0]): (r[1], r[2], r[3]) for r in rows} == folded
