"""The pieces the transport conformance scenarios are made of.

A ``Scenario`` opens transports from a URL, names channels and groups uniquely,
publishes numbered messages, consumes until given numbers have arrived, waits for
a group's assignment to settle and runs consumer child processes; it closes and
kills everything it opened when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from nervus.transports import (
    Delivery,
    OutgoingMessage,
    Start,
    Subscription,
    Transport,
    from_url,
)

NUMBER_HEADER = "nervus-test-n"
"""The header carrying a test message's number."""


def number(delivery: Delivery) -> int:
    """The number a scenario gave the message it published."""
    raw = delivery.headers.get(NUMBER_HEADER)
    if raw is None:
        pytest.fail(
            f"delivery {describe(delivery)} lost its headers: no {NUMBER_HEADER!r} in "
            f"{delivery.headers!r}"
        )
    return int(raw)


def numbers(deliveries: Iterable[Delivery]) -> list[int]:
    return [number(d) for d in deliveries]


def describe(delivery: Delivery) -> str:
    return (
        f"{delivery.channel}[{delivery.partition}]@{delivery.offset} "
        f"(attempt {delivery.attempt}, key {delivery.key!r})"
    )


def body_of(n: int) -> bytes:
    return f"message {n} \x00\xff".encode("latin-1")


def message(n: int, key: str | None) -> OutgoingMessage:
    return OutgoingMessage(
        key=key,
        headers={NUMBER_HEADER: str(n), "ce_id": f"id-{n}-{uuid.uuid4().hex}", "x-text": "é ü"},
        body=body_of(n),
    )


def default_key(n: int) -> str:
    return f"key-{n % 7}"


def short(values: Collection[int], limit: int = 20) -> str:
    ordered = sorted(values)
    text = ", ".join(str(v) for v in ordered[:limit])
    return f"[{text}{', ...' if len(ordered) > limit else ''}] ({len(ordered)} in all)"


class Scenario:
    """Everything one conformance scenario opens, closed when it ends."""

    def __init__(self, url: str, *, rebalance_timeout: float, delivery_timeout: float) -> None:
        self.url = url
        self.rebalance_timeout = rebalance_timeout
        self.delivery_timeout = delivery_timeout
        self.token = uuid.uuid4().hex[:12]
        self._transports: list[Transport] = []
        self._children: list[ConsumerChild] = []
        self._child_news = asyncio.Event()

    def name(self, what: str) -> str:
        """A channel or group name no other scenario uses."""
        return f"conformance-{what}-{self.token}"

    @asynccontextmanager
    async def within(self, seconds: float, what: str) -> AsyncIterator[None]:
        """Fail the scenario, naming ``what``, if the block takes longer than ``seconds``."""
        limit = asyncio.timeout(seconds)
        try:
            async with limit:
                yield
        except TimeoutError:
            if limit.expired():
                pytest.fail(f"{what} did not complete within {seconds}s")
            raise

    async def open(self) -> Transport:
        """A new transport from the scenario's URL, connected."""
        transport = from_url(self.url)
        await transport.connect()
        self._transports.append(transport)
        return transport

    async def publish(
        self,
        transport: Transport,
        channel: str,
        ns: Iterable[int],
        key: Callable[[int], str | None] = default_key,
    ) -> list[int]:
        """Publish numbered messages in one call; return their numbers."""
        ns = list(ns)
        await transport.publish(channel, [message(n, key(n)) for n in ns])
        return ns

    async def consume(
        self,
        subscription: Subscription,
        wanted: Collection[int],
        *,
        ack: bool = True,
        max_messages: int = 50,
        into: list[Delivery] | None = None,
    ) -> list[Delivery]:
        """Fetch (and ack, unless told not to) until every number in ``wanted`` came."""
        got: list[Delivery] = [] if into is None else into
        missing = set(wanted) - set(numbers(got))
        try:
            async with asyncio.timeout(self.delivery_timeout):
                while missing:
                    batch = await subscription.fetch(max_messages, 0.1)
                    check_fetch_bound(batch, max_messages)
                    got.extend(batch)
                    if ack and batch:
                        await subscription.ack(batch)
                    missing.difference_update(numbers(batch))
        except TimeoutError:
            pytest.fail(
                f"waited {self.delivery_timeout}s (delivery_timeout) for messages "
                f"{short(missing)} on group {subscription.group!r}; got {short(numbers(got))}; "
                f"assignment {sorted(subscription.assignment())}"
            )
        return got

    async def consume_together(
        self,
        members: Sequence[Subscription],
        wanted: Collection[int],
        into: Sequence[list[Delivery]],
    ) -> None:
        """Members fetch and ack concurrently until, together, they got all of ``wanted``."""
        missing = set(wanted) - {n for got in into for n in numbers(got)}
        done = asyncio.Event()
        if not missing:
            done.set()

        async def run(member: Subscription, got: list[Delivery]) -> None:
            while not done.is_set():
                batch = await member.fetch(50, 0.05)
                check_fetch_bound(batch, 50)
                if batch:
                    got.extend(batch)
                    await member.ack(batch)
                    missing.difference_update(numbers(batch))
                    if not missing:
                        done.set()

        try:
            async with asyncio.timeout(self.delivery_timeout):
                await asyncio.gather(*(run(m, g) for m, g in zip(members, into, strict=True)))
        except TimeoutError:
            pytest.fail(
                f"waited {self.delivery_timeout}s (delivery_timeout) for messages "
                f"{short(missing)}; assignments {[sorted(m.assignment()) for m in members]}"
            )

    async def expect_quiet(self, subscription: Subscription, seconds: float) -> list[Delivery]:
        """Fetch (and ack) for ``seconds``; return whatever still came."""
        got: list[Delivery] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            batch = await subscription.fetch(50, min(left, 0.1))
            if batch:
                got.extend(batch)
                await subscription.ack(batch)
        return got

    async def wait_for_assignment(
        self,
        members: Sequence[Subscription],
        pairs: Collection[tuple[str, int]],
        into: Sequence[list[Delivery]] | None = None,
    ) -> None:
        """Fetch with all members until their assignments are disjoint, cover ``pairs``
        and give each member a share (when there are enough partitions).

        Fetching drives lease heartbeats on transports that need them. What is
        fetched meanwhile is acked and added to ``into``; without ``into`` nothing
        may arrive.
        """
        wanted = frozenset(pairs)
        deadline = time.monotonic() + self.rebalance_timeout
        while True:
            current = [m.assignment() for m in members]
            if settled(current, wanted):
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"group assignment did not settle within {self.rebalance_timeout}s "
                    f"(rebalance_timeout): members own {[sorted(a) for a in current]}, "
                    f"wanted a disjoint split of {sorted(wanted)} with a share for each"
                )
            batches = await asyncio.gather(*(m.fetch(20, 0.05) for m in members))
            for i, (member, batch) in enumerate(zip(members, batches, strict=True)):
                if not batch:
                    continue
                if into is None:
                    pytest.fail(
                        f"unexpected deliveries while waiting for the assignment: "
                        f"{[describe(d) for d in batch]}"
                    )
                into[i].extend(batch)
                await member.ack(batch)

    async def subscribe(
        self,
        transport: Transport,
        channels: Iterable[str],
        group: str,
        *,
        start: Start | None = None,
        max_in_flight: int = 1000,
    ) -> Subscription:
        return await transport.subscribe(
            list(channels), group, start=start, max_in_flight=max_in_flight
        )

    async def start_child(self, channel: str, group: str, *options: str) -> ConsumerChild:
        """Run ``python -m nervus.testing._consumer_child URL CHANNEL GROUP *options``."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nervus.testing._consumer_child",
            self.url,
            channel,
            group,
            *options,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        child = ConsumerChild(process, self._child_news)
        self._children.append(child)
        return child

    async def wait_for_children(
        self, condition: Callable[[], bool], seconds: float, what: str
    ) -> None:
        """Wait until the children's reports satisfy ``condition``; fail naming ``what``
        if they do not within ``seconds`` or a child exits first."""
        try:
            async with asyncio.timeout(seconds):
                while not condition() and not any(c.ended for c in self._children):
                    self._child_news.clear()
                    await self._child_news.wait()
        except TimeoutError:
            pass
        if not condition():
            reports = "\n".join(f"  child {i}: {c.report()}" for i, c in enumerate(self._children))
            pytest.fail(f"consumer processes did not {what} within {seconds}s:\n{reports}")

    async def close(self) -> None:
        for child in self._children:
            await child.kill()
        for transport in reversed(self._transports):
            async with asyncio.timeout(30):
                await transport.close()


def settled(assignments: Sequence[frozenset[tuple[str, int]]], wanted: frozenset[Any]) -> bool:
    """Disjoint, covering ``wanted``, and a share for each member when there are enough."""
    union: set[tuple[str, int]] = set()
    for owned in assignments:
        if union & owned:
            return False
        union |= owned
    if union != wanted:
        return False
    return len(wanted) < len(assignments) or all(assignments)


def check_fetch_bound(batch: Sequence[Delivery], asked: int) -> None:
    if len(batch) > asked:
        pytest.fail(f"fetch({asked}) returned {len(batch)} deliveries, more than asked")


class ConsumerChild:
    """A consumer in a child process, reporting what it does as JSON lines.

    ``news`` is set whenever the child reports something or exits.
    """

    def __init__(self, process: asyncio.subprocess.Process, news: asyncio.Event) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._news = news
        self._readers = [
            asyncio.ensure_future(self._read_events()),
            asyncio.ensure_future(self._read_stderr()),
        ]

    async def _read_events(self) -> None:
        stdout = self.process.stdout
        if stdout is None:
            raise RuntimeError("the consumer process was started without a stdout pipe")
        async for line in stdout:
            text = line.decode().strip()
            if text:
                try:
                    self.events.append(json.loads(text))
                except ValueError:
                    self.events.append({"event": "output", "text": text})
                self._news.set()
        self._news.set()

    async def _read_stderr(self) -> None:
        stderr = self.process.stderr
        if stderr is None:
            raise RuntimeError("the consumer process was started without a stderr pipe")
        self.stderr = await stderr.read()
        self._news.set()

    @property
    def ended(self) -> bool:
        """The process exited (its output is closed)."""
        return self.process.returncode is not None or self._readers[0].done()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def delivered(self) -> list[int]:
        return [int(e["n"]) for e in self.of_kind("delivery")]

    def acked(self) -> list[int]:
        return [int(n) for e in self.of_kind("acked") for n in e["ns"]]

    def assignment(self) -> frozenset[tuple[str, int]]:
        changes = self.of_kind("assignment")
        if not changes:
            return frozenset()
        return frozenset((c, int(p)) for c, p in changes[-1]["pairs"])

    def report(self) -> str:
        """What the child said, for a failure message."""
        return (
            f"exit code {self.process.returncode}; reported {self.events[-20:]}; "
            f"stderr: {self.stderr.decode(errors='replace')[-2000:]}"
        )

    async def kill(self) -> int:
        """SIGKILL, as a crash would; return the exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
        code = await self.process.wait()
        await self._finish_reading()
        return code

    async def terminate(self, seconds: float) -> int:
        """SIGTERM: the child closes its subscription and exits."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(seconds):
                code = await self.process.wait()
        except TimeoutError:
            pytest.fail(f"consumer process did not stop within {seconds}s of SIGTERM")
        await self._finish_reading()
        return code

    async def _finish_reading(self) -> None:
        _, pending = await asyncio.wait(self._readers, timeout=5)
        for reader in pending:
            reader.cancel()
