"""The transport contract: what every broker adapter promises the runtime.

A *channel* is a named, partitioned, ordered log of messages (a Kafka topic, a
JetStream stream, a Redis stream per partition, an embedded SQLite log).

Publishing
    ``publish(channel, messages)`` returns only once the broker has durably
    accepted every message (written and, where the broker replicates, replicated
    per its acknowledgement setting). Messages with the same ``key`` go to the
    same partition and keep their publish order. On error nothing is implied:
    some messages may have been accepted; publishing again may duplicate them
    (consumers deduplicate by ``ce_id`` through the inbox).

Consuming
    ``subscribe(channels, group)`` joins consumer group ``group``. Within a group
    each partition is owned by one member at a time, so each message reaches one
    member; members joining or leaving rebalance the partitions among the
    members alive. A group with no committed position starts at the beginning
    of each partition (nothing published before the group existed is skipped).

    ``fetch(max_messages, timeout)`` waits up to ``timeout`` seconds for messages
    and returns at most ``max_messages``, in offset order per partition. The
    caller bounds what is in flight by what it asks for: a transport never hands
    out more than was asked and never buffers without limit.

Settling
    Every delivery is settled exactly once, by one of
      - ``ack(deliveries)``: done;
      - ``nack(delivery, delay)``: deliver it again, as ``attempt + 1``, no earlier
        than ``delay`` seconds from now; durable once the call returns;
      - ``dead_letter(delivery, reason)``: move it to the dead-letter channel
        (``dead_letter_channel(channel, group)``) with the reason; durable once the
        call returns.
    Deliveries may be settled in any order. A transport that commits a position
    per partition commits it only up to the lowest unsettled offset
    (``OffsetTracker``); one whose broker acknowledges each message (Redis
    Streams, RabbitMQ, JetStream) acknowledges each as it is settled. What was
    fetched but not settled when a member stops or dies is delivered again to the
    partition's next owner. Delivery is therefore at least once; exactly-once
    *effects* come from the inbox, not from here.

    ``attempt`` counts deliveries where the broker counts them (Redis, JetStream,
    RabbitMQ quorum queues); a log that does not (Kafka, SQLite, PostgreSQL)
    counts only nacks, so a message redelivered after a member died may come
    again as the same attempt.

Replay
    Where the broker keeps history (``Features.replay``), ``start=`` on subscribe
    moves the group's position: to the beginning, to given offsets, or to the
    first message at or after a time.

Closing
    ``Subscription.close()`` stops fetching, commits what was settled and leaves
    the group. ``Transport.close()`` closes its subscriptions and connections.
    Calls after close raise ``TransportClosed``. Transports and subscriptions are
    used from one asyncio event loop; they are not thread-safe.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

import msgspec

from nervus.errors import TransportClosed


class OutgoingMessage(msgspec.Struct, gc=False):
    """A message to publish: partition ``key`` (None: any partition), headers, body."""

    key: str | None
    headers: dict[str, str]
    body: bytes


class Delivery(msgspec.Struct, gc=False):
    """A message handed to a consumer, with where it came from and how often it came."""

    channel: str
    partition: int
    offset: int
    key: str | None
    headers: dict[str, str]
    body: bytes
    attempt: int = 1
    timestamp: float = 0.0
    handle: object = None  # private to the transport that made it


class DeadLetterReason(msgspec.Struct, frozen=True):
    """Why a message was dead-lettered. ``reason`` is a short code:
    ``decode-error``, ``unknown-type``, ``handler-failed`` or ``rejected``."""

    reason: str
    message: str
    error_type: str | None = None
    traceback: str | None = None
    attempts: int = 1


class Start(msgspec.Struct, frozen=True):
    """Where a subscription starts reading.

    ``Start.committed()`` (the default) resumes from the group's committed
    positions; the others move the group's positions first (replay).
    """

    kind: Literal["committed", "beginning", "end", "offsets", "time"] = "committed"
    offsets: dict[str, dict[int, int]] | None = None
    time: float | None = None

    @classmethod
    def committed(cls) -> Start:
        return cls()

    @classmethod
    def beginning(cls) -> Start:
        return cls(kind="beginning")

    @classmethod
    def end(cls) -> Start:
        return cls(kind="end")

    @classmethod
    def at(cls, offsets: Mapping[str, Mapping[int, int]]) -> Start:
        """From ``offsets[channel][partition]`` inclusive; other partitions keep their position."""
        return cls(kind="offsets", offsets={c: dict(p) for c, p in offsets.items()})

    @classmethod
    def at_time(cls, timestamp: float) -> Start:
        """From the first message accepted at or after ``timestamp`` (Unix seconds)."""
        return cls(kind="time", time=timestamp)


@dataclass(frozen=True)
class Features:
    """What a transport supports. The conformance suite skips what is declared
    missing, printing the reason, and fails what is declared but broken."""

    cross_process_groups: bool = True
    replay: bool = True
    replay_from_time: bool = True
    delayed_redelivery: bool = True
    reasons: Mapping[str, str] = field(default_factory=dict)


def dead_letter_channel(channel: str, group: str) -> str:
    """The channel where ``group`` dead-letters what it could not handle from ``channel``."""
    return f"{channel}.{group}.dlq"


def dead_letter_message(
    delivery: Delivery, group: str, reason: DeadLetterReason
) -> OutgoingMessage:
    """The dead-letter copy of a delivery: the original body and headers, plus
    ``nervus_dlq_*`` headers with the reason and the original position."""
    headers = dict(delivery.headers)
    headers.update(
        {
            "nervus_dlq_reason": reason.reason,
            "nervus_dlq_message": reason.message,
            "nervus_dlq_attempts": str(reason.attempts),
            "nervus_dlq_group": group,
            "nervus_dlq_channel": delivery.channel,
            "nervus_dlq_partition": str(delivery.partition),
            "nervus_dlq_offset": str(delivery.offset),
        }
    )
    if reason.error_type is not None:
        headers["nervus_dlq_error_type"] = reason.error_type
    if reason.traceback is not None:
        headers["nervus_dlq_traceback"] = reason.traceback
    return OutgoingMessage(key=delivery.key, headers=headers, body=delivery.body)


class Subscription(ABC):
    """One member of a consumer group, reading one or more channels."""

    group: str
    channels: tuple[str, ...]

    @abstractmethod
    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        """Up to ``max_messages`` deliveries; waits up to ``timeout`` s for the first."""

    @abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Settle deliveries as done."""

    @abstractmethod
    async def nack(self, delivery: Delivery, delay: float) -> None:
        """Settle a delivery for redelivery as ``attempt + 1`` after at least ``delay`` s."""

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, reason: DeadLetterReason) -> None:
        """Settle a delivery by moving it to ``dead_letter_channel`` with ``reason``."""

    @abstractmethod
    def assignment(self) -> frozenset[tuple[str, int]]:
        """The ``(channel, partition)`` pairs this member owns right now."""

    @abstractmethod
    async def close(self) -> None:
        """Stop, commit what was settled, leave the group. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class Transport(ABC):
    """A connection to one broker (or the embedded log)."""

    features: Features = Features()

    @abstractmethod
    async def connect(self) -> None:
        """Open connections; fail with ``TransportUnavailable`` naming the URL if unreachable."""

    @abstractmethod
    async def ensure_channel(self, channel: str, partitions: int | None = None) -> int:
        """Create ``channel`` if missing; return its partition count (existing count wins)."""

    @abstractmethod
    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        """Durably append ``messages`` to ``channel`` (created on first use)."""

    @abstractmethod
    async def subscribe(
        self,
        channels: Iterable[str],
        group: str,
        *,
        max_in_flight: int = 1000,
        start: Start | None = None,
    ) -> Subscription:
        """Join ``group`` on ``channels``; ``max_in_flight`` hints prefetch limits."""

    @abstractmethod
    async def close(self) -> None:
        """Close every subscription and connection. Idempotent."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class OffsetTracker:
    """Turns out-of-order settlement into the contiguous position a log may commit.

    ``fetched`` records offsets in delivery order per partition; ``settle`` marks
    one done and returns the new commit position (the offset after the last
    contiguous settled one) when it moved, else None.
    """

    __slots__ = ("_done", "_pending")

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], list[int]] = {}
        self._done: dict[tuple[str, int], set[int]] = {}

    def fetched(self, channel: str, partition: int, offset: int) -> None:
        key = (channel, partition)
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = pending = []
            self._done[key] = set()
        pending.append(offset)

    def settle(self, channel: str, partition: int, offset: int) -> int | None:
        key = (channel, partition)
        pending = self._pending.get(key)
        if not pending:
            return None
        if pending[0] != offset:
            self._done[key].add(offset)
            return None
        done = self._done[key]
        i = 1
        while i < len(pending) and pending[i] in done:
            done.discard(pending[i])
            i += 1
        last = pending[i - 1]
        del pending[:i]
        return last + 1

    def forget(self, channel: str, partition: int) -> None:
        """Drop a partition's state (it was revoked)."""
        self._pending.pop((channel, partition), None)
        self._done.pop((channel, partition), None)

    def in_flight(self) -> int:
        return sum(len(p) for p in self._pending.values())


def ensure_open(closed: bool, what: str) -> None:
    if closed:
        raise TransportClosed(f"{what} is closed")


def partition_for(key: str | None, partitions: int, counter: int) -> int:
    """The partition of a message: a stable hash of ``key`` (CRC-32), or ``counter``
    round-robin when there is no key."""
    if key is None:
        return counter % partitions
    return zlib.crc32(key.encode()) % partitions
