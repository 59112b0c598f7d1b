"""The in-process broker: partitioned logs, consumer groups and their positions.

One ``Broker`` per name lives for the life of the process, like a server the
transports connect to: closing a transport leaves its messages and its groups'
committed positions in place, so a transport opened later with the same name
resumes where the group stopped.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nervus.transports.memory._transport import MemorySubscription

Pair = tuple[str, int]
"""A ``(channel, partition)``."""


@dataclass(slots=True)
class Record:
    """One accepted message; its offset is its index in the partition's log."""

    key: str | None
    headers: dict[str, str]
    body: bytes
    timestamp: float


class Channel:
    """A named log split into a fixed number of partitions."""

    __slots__ = ("counter", "logs", "name")

    def __init__(self, name: str, partitions: int) -> None:
        self.name = name
        self.logs: list[list[Record]] = [[] for _ in range(partitions)]
        self.counter = 0  # round-robin for messages without a key


@dataclass(slots=True)
class Redelivery:
    """A nacked message waiting (or handed out again) as ``attempt``.

    ``holder`` is the member it was handed to, ``token`` identifies that hand-out
    so that a settlement of an older copy cannot remove a newer one.
    """

    attempt: int
    due: float  # time.monotonic()
    holder: MemorySubscription | None = None
    token: int = 0


@dataclass(slots=True)
class Group:
    """A consumer group: committed positions, live members, pending redeliveries."""

    name: str
    committed: dict[Pair, int] = field(default_factory=dict)
    members: list[MemorySubscription] = field(default_factory=list)
    redeliveries: dict[tuple[str, int, int], Redelivery] = field(default_factory=dict)


class Broker:
    """Every channel and group of one ``memory://NAME``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.channels: dict[str, Channel] = {}
        self.groups: dict[str, Group] = {}
        self._tokens = itertools.count(1)

    def next_token(self) -> int:
        return next(self._tokens)

    def channel(self, name: str, partitions: int) -> Channel:
        """The channel ``name``, created with ``partitions`` if missing."""
        existing = self.channels.get(name)
        if existing is None:
            self.channels[name] = existing = Channel(name, partitions)
        return existing

    def group(self, name: str) -> Group:
        existing = self.groups.get(name)
        if existing is None:
            self.groups[name] = existing = Group(name)
        return existing

    def append(
        self,
        channel: Channel,
        partition: int,
        key: str | None,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        log = channel.logs[partition]
        now = time.time()
        # Timestamps never go backwards within a partition, so a replay from a
        # time can bisect the log.
        if log and log[-1].timestamp > now:
            now = log[-1].timestamp
        log.append(Record(key, dict(headers), body, now))

    def notify(self, channel: str) -> None:
        """Wake the members that read ``channel``."""
        for group in self.groups.values():
            for member in group.members:
                if channel in member.channels:
                    member.wake()

    def rebalance(self, group: Group) -> None:
        """Split the partitions of the subscribed channels among the live members.

        Deterministic: pairs in sorted order each go to the eligible member (one
        subscribed to the pair's channel) with the fewest pairs so far, ties
        broken by join order.
        """
        wanted: dict[MemorySubscription, set[Pair]] = {m: set() for m in group.members}
        for pair in self._pairs(group):
            eligible = [m for m in group.members if pair[0] in m.channels]
            owner = min(eligible, key=lambda m: len(wanted[m]))
            wanted[owner].add(pair)
        for member, pairs in wanted.items():
            member.assign(pairs)

    def _pairs(self, group: Group) -> Iterator[Pair]:
        names = sorted({c for m in group.members for c in m.channels})
        for name in names:
            for partition in range(len(self.channels[name].logs)):
                yield (name, partition)


_BROKERS: dict[str, Broker] = {}


def broker_named(name: str) -> Broker:
    """The process-wide broker called ``name``, created on first use."""
    broker = _BROKERS.get(name)
    if broker is None:
        _BROKERS[name] = broker = Broker(name)
    return broker
