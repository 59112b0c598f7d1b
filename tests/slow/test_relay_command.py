"""``nervus relay`` as processes of their own: two of them on one store publish every
outbox message once, one taking over when the other stops; ``nervus outbox status``
shows what waits and what the broker refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from nervus.storage import store_from_url
from nervus.transports import Delivery, from_url

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def start_relay(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "nervus", "relay"], env=env, stderr=out, cwd=ROOT
        )


async def started(*logs: Path, within: float = 60.0) -> None:
    """Wait until each relay says it started (its signal handlers are installed)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all("service 'relay' started" in log.read_text(errors="replace") for log in logs):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("a relay did not start: " + " / ".join(p.read_text() for p in logs))


def outbox_status(env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "nervus", "outbox", "status", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def environment(store: str, transport: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERVUS_")}
    env.update(NERVUS_STORE=store, NERVUS_TRANSPORT=transport, NERVUS_PUBLISH_TIMEOUT="2")
    return env


async def enqueue(store_url: str, count: int, *, start: int = 0) -> None:
    async with store_from_url(store_url) as store:
        for n in range(start, start + count, 50):
            async with store.transaction() as tx:
                for k in range(n, min(n + 50, start + count)):
                    await tx.enqueue("relayed", f"key-{k % 7}", {"ce_id": f"m-{k}"}, b"{}")
            await asyncio.sleep(0.01)


async def read_all(url: str, channel: str) -> list[Delivery]:
    transport = from_url(url)
    await transport.connect()
    got: list[Delivery] = []
    try:
        sub = await transport.subscribe([channel], f"check-{uuid.uuid4().hex[:6]}")
        while batch := await sub.fetch(1000, 0.5):
            got.extend(batch)
        await sub.ack(got)
    finally:
        await transport.close()
    return got


async def test_two_relays_publish_every_message_once(store_url: str, tmp_path: Path) -> None:
    transport = f"sqlite:///{tmp_path}/log.db?partitions=4"
    env = environment(store_url, transport)
    async with store_from_url(store_url):
        pass  # the tables exist before the relays start
    relays = [start_relay(env, tmp_path / f"relay{n}.log") for n in range(2)]
    await started(tmp_path / "relay0.log", tmp_path / "relay1.log")
    try:
        await enqueue(store_url, 600)
        await asyncio.sleep(1.0)
        relays[0].send_signal(signal.SIGTERM)  # a clean stop: the other one takes over
        assert relays[0].wait(30) == 0
        await enqueue(store_url, 400, start=600)
        async with store_from_url(store_url) as store:
            deadline = time.monotonic() + 60
            while (await store.outbox_counts())[0] and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert (await store.outbox_counts())[0] == 0, (tmp_path / "relay1.log").read_text()
        relays[1].send_signal(signal.SIGTERM)
        assert relays[1].wait(30) == 0
    finally:
        for relay in relays:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
    delivered = Counter(d.headers["ce_id"] for d in await read_all(transport, "relayed"))
    assert set(delivered) == {f"m-{k}" for k in range(1000)}
    assert max(delivered.values()) == 1, "a message was published twice"

    code, output = outbox_status(env)
    assert code == 0, output
    shown = json.loads(output)
    assert (shown["pending"], shown["sent_kept"], shown["dead_letters"]) == (0, 1000, [])
