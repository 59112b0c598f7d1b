"""The SQLite log shared by processes: concurrent writers keep per-key order and
lose nothing; a member killed with SIGKILL loses its partitions when its lease ends."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from nervus.transports import Delivery, OutgoingMessage
from nervus.transports.sqlite import SqliteTransport

pytestmark = pytest.mark.slow

PRODUCER = textwrap.dedent(
    """
    import asyncio, random, sys
    from nervus.transports import OutgoingMessage, from_url

    async def main(url, name, count):
        rng = random.Random(name)
        async with from_url(url) as t:
            print("ready", flush=True)
            sys.stdin.readline()
            n = 0
            while n < count:
                size = min(rng.randint(1, 40), count - n)
                batch = [
                    OutgoingMessage(f"{name}-{i % 7}", {"p": name, "n": str(i)}, b"x")
                    for i in range(n, n + size)
                ]
                await t.publish("shared", batch)
                n += size
        print("done", flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)

HOLDER = textwrap.dedent(
    """
    import asyncio, json, sys
    from nervus.transports import from_url

    async def main(url):
        t = from_url(url)
        await t.connect()
        sub = await t.subscribe(["work"], "g")
        held = []
        while len(held) < int(sys.argv[2]):
            held.extend(await sub.fetch(100, 0.2))
        owned = sorted(p for _, p in sub.assignment())
        print(json.dumps({"owned": owned, "held": len(held)}), flush=True)
        await asyncio.sleep(3600)  # holds its deliveries unsettled until killed

    asyncio.run(main(sys.argv[1]))
    """
)


async def spawn(code: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(30):
        text = await process.stdout.readline()
    assert text, f"child process ended early (exit code {await process.wait()})"
    return text.decode().strip()


async def test_two_processes_publishing_keep_key_order_and_lose_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db?partitions=4"
    count = 1500
    async with SqliteTransport.from_url(url) as t:
        await t.ensure_channel("shared")
        children = [await spawn(PRODUCER, url, name, str(count)) for name in ("a", "b")]
        try:
            for child in children:
                assert await line(child) == "ready"
            for child in children:
                assert child.stdin is not None
                child.stdin.write(b"go\n")
                await child.stdin.drain()
            for child in children:
                assert await line(child) == "done"
                async with asyncio.timeout(30):
                    assert await child.wait() == 0
        finally:
            for child in children:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
        sub = await t.subscribe(["shared"], "check")
        got: list[Delivery] = []
        async with asyncio.timeout(30):
            while len(got) < 2 * count:
                got.extend(await sub.fetch(1000, 0.5))
        assert await sub.fetch(10, 0.2) == []
    seen = [(d.headers["p"], int(d.headers["n"])) for d in got]
    assert len(set(seen)) == len(seen) == 2 * count
    per_key: dict[str | None, list[int]] = defaultdict(list)
    for d in sorted(got, key=lambda d: (d.partition, d.offset)):
        per_key[d.key].append(int(d.headers["n"]))
    for key, order in per_key.items():
        assert order == sorted(order), f"key {key} out of order"


async def test_partitions_of_a_killed_member_are_taken_over(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db?partitions=4&lease_seconds=1&heartbeat_seconds=0.2"
    async with SqliteTransport.from_url(url) as t:
        await t.ensure_channel("work", 4)
        await t.publish("work", [OutgoingMessage(f"k{n}", {"n": str(n)}, b"") for n in range(40)])
        child = await spawn(HOLDER, url, "40")
        try:
            report = json.loads(await line(child))
            assert report == {"owned": [0, 1, 2, 3], "held": 40}
            sub = await t.subscribe(["work"], "g")
            got: list[Delivery] = []
            async with asyncio.timeout(20):  # a share arrives while the holder lives
                while not sub.assignment():
                    got.extend(await sub.fetch(100, 0.1))
            assert len(sub.assignment()) < 4
            child.send_signal(signal.SIGKILL)
            await child.wait()
            async with asyncio.timeout(20):  # the rest once the holder's lease ends
                while len({int(d.headers["n"]) for d in got}) < 40:
                    batch = await sub.fetch(100, 0.1)
                    got.extend(batch)
                    await sub.ack(batch)
            assert len(sub.assignment()) == 4
            assert all(d.attempt == 1 for d in got)
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
