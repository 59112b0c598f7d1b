"""The relay killed with SIGKILL at random while events are appended: every event
reaches the transport, duplicates carry the event's own id, and each stream's
events arrive in version order."""

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

import pytest
from _reading import read_everything

from nervus.core import Envelope
from nervus.storage import ANY, store_from_url

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("store_crash_child.py")
ROOT = Path(__file__).resolve().parents[2]
STREAMS, ROUNDS = 12, 60
CHAOS_SECONDS = 8.0


def start_relay(store: str, transport: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(CHILD), "relay", store, transport], env=env, stderr=out
        )


async def test_a_relay_killed_at_random_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("NERVUS_TEST_SEED", "99")))
    store_url = f"sqlite:///{tmp_path}/store.db"
    transport_url = f"sqlite:///{tmp_path}/log.db?partitions=4"
    log = tmp_path / "relay.log"
    appended: dict[str, list[str]] = defaultdict(list)  # stream -> event ids in version order
    kills = 0
    async with store_from_url(store_url) as store:

        async def append_rounds() -> None:
            for n in range(ROUNDS):
                batch = [
                    Envelope.new(type="crash.relay.moved.v1", source="test", data=b'{"n":%d}' % n)
                    for _ in range(STREAMS)
                ]
                await asyncio.gather(
                    *(store.append(f"s{k}", [e], ANY) for k, e in enumerate(batch))
                )
                for k, e in enumerate(batch):
                    appended[f"s{k}"].append(e.id)
                await asyncio.sleep(rng.uniform(0, 0.1))

        relay = start_relay(store_url, transport_url, log)
        appending = asyncio.create_task(append_rounds())
        try:
            chaos_until = time.monotonic() + CHAOS_SECONDS
            while time.monotonic() < chaos_until:
                await asyncio.sleep(rng.uniform(0.1, 0.8))
                relay.send_signal(signal.SIGKILL)
                relay.wait()
                kills += 1
                relay = start_relay(store_url, transport_url, log)
            await appending
            head = await store.head()
            async with asyncio.timeout(60):
                while await store.load_checkpoint("relay:main") < head:
                    assert relay.poll() is None, log.read_text()[-3000:]
                    await asyncio.sleep(0.1)
        finally:
            relay.send_signal(signal.SIGKILL)
            relay.wait()
    deliveries = await read_everything(transport_url, "crash.relay", idle=0.5)
    received: dict[str, list[str]] = defaultdict(list)
    for d in deliveries:
        received[str(d.key)].append(d.headers["ce_id"])
    total = sum(len(ids) for ids in appended.values())
    assert kills >= 5
    assert {i for ids in received.values() for i in ids} == {
        i for ids in appended.values() for i in ids
    }, "an event never reached the transport"
    for stream, ids in appended.items():
        first_seen = list(dict.fromkeys(received[stream]))
        assert first_seen == ids, f"{stream}: events out of order"
    duplicates = len(deliveries) - total
    assert duplicates >= 0
    print(f"{total} events, {kills} relay kills, {duplicates} duplicates (same ids)")
