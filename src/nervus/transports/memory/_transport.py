"""The in-memory transport: the transport contract, kept entirely in this process.

``memory://NAME?partitions=4`` opens the broker ``NAME`` (``default`` when
omitted); every transport opened with the same name in one process shares it, so
services in one process talk to each other through it. It is a real
implementation of the contract, not a mock: partitioned append-only logs,
consumer groups that split partitions among live members and rebalance at once
on join and leave, positions committed up to the lowest unsettled offset,
delayed redelivery, dead-lettering and replay. Nothing survives the process;
a broker's messages and committed positions outlive its transports, so one
opened later with the same name resumes where its group stopped.

Beyond the contract:
    - a ``fetch`` waiting when its subscription closes raises ``TransportClosed``;
    - settling a delivery twice, or on a subscription that did not fetch it,
      raises ``ValueError``;
    - settling a delivery of a partition the member lost since changes nothing:
      the partition's next owner delivers it again from the committed position;
    - a nacked message stays with the group (not the member) until it is
      settled, so a redelivery waiting or handed out outlives a member that leaves.

Options:
    ``partitions`` (default 4): partition count of channels this transport creates.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from nervus.errors import TransportClosed, TransportError
from nervus.transports._contract import (
    DeadLetterReason,
    Delivery,
    Features,
    OffsetTracker,
    OutgoingMessage,
    Start,
    Subscription,
    Transport,
    dead_letter_channel,
    dead_letter_message,
    partition_for,
)
from nervus.transports._urls import parse_options
from nervus.transports.memory._broker import Broker, Group, Pair, Redelivery, broker_named


class MemoryOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Options of a ``memory://`` URL."""

    partitions: int = 4

    def validate(self) -> list[str]:
        if self.partitions < 1:
            return [f"option partitions={self.partitions}: must be 1 or more"]
        return []


@dataclass(slots=True)
class _Handle:
    """What a delivery carries back to its subscription when settled."""

    member: MemorySubscription
    epoch: int  # the ownership epoch of the partition when it was handed out
    token: int | None  # the redelivery hand-out, None for a read from the log
    settled: bool = False


class MemorySubscription(Subscription):
    """One member of a consumer group on the in-process broker."""

    def __init__(
        self, transport: MemoryTransport, broker: Broker, group: Group, channels: tuple[str, ...]
    ) -> None:
        self.group = group.name
        self.channels = channels
        self._transport = transport
        self._broker = broker
        self._group = group
        self._owned: dict[Pair, int] = {}  # pair -> ownership epoch
        self._cursors: dict[Pair, int] = {}  # next offset to read, per owned pair
        self._tracker = OffsetTracker()
        self._wakeup = asyncio.Event()
        self._rotation = 0
        self._closed = False

    # -- the contract ---------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        self._check_open()
        if max_messages < 0:
            raise ValueError(f"fetch(max_messages={max_messages}): must be 0 or more")
        if timeout < 0:
            raise ValueError(f"fetch(timeout={timeout}): must be 0 or more")
        # Always yield to the loop once, as a network round trip would: a consumer
        # that always finds messages must not starve the loop's other tasks.
        await asyncio.sleep(0)
        self._check_open()
        if max_messages == 0:
            return []
        deadline = time.monotonic() + timeout
        while True:
            self._wakeup.clear()
            out = self._collect(max_messages)
            if out:
                return out
            now = time.monotonic()
            wait = deadline - now
            if wait <= 0:
                return out
            due = self._next_due()
            if due is not None:
                wait = min(wait, max(due - now, 0.0))
            try:
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._check_open()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self._check_open()
        handles = [self._take(d) for d in deliveries]
        for delivery, handle in zip(deliveries, handles, strict=True):
            handle.settled = True
            self._settle(delivery, handle)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        self._check_open()
        if delay < 0:
            raise ValueError(f"nack(delay={delay}): must be 0 or more seconds")
        handle = self._take(delivery)
        handle.settled = True
        if not self._current(delivery, handle):
            return  # revoked: the partition's next owner delivers it again
        key = (delivery.channel, delivery.partition, delivery.offset)
        redelivery = Redelivery(attempt=delivery.attempt + 1, due=time.monotonic() + delay)
        if handle.token is None:
            self._commit(delivery.channel, delivery.partition, delivery.offset)
        self._group.redeliveries[key] = redelivery
        self._wakeup.set()

    async def dead_letter(self, delivery: Delivery, reason: DeadLetterReason) -> None:
        self._check_open()
        handle = self._take(delivery)
        handle.settled = True
        if not self._current(delivery, handle):
            return  # revoked: the partition's next owner decides again
        await self._transport.publish(
            dead_letter_channel(delivery.channel, self.group),
            [dead_letter_message(delivery, self.group, reason)],
        )
        self._settle(delivery, handle)

    def assignment(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._owned)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        group = self._group
        if self in group.members:
            group.members.remove(self)
        self.assign(set())
        self._broker.rebalance(group)
        self._transport.forget(self)
        self._wakeup.set()

    # -- called by the broker -------------------------------------------------------

    def wake(self) -> None:
        self._wakeup.set()

    def assign(self, pairs: set[Pair]) -> None:
        """Take the partitions ``pairs``; drop the state of the ones given up."""
        changed = False
        for pair in list(self._owned):
            if pair not in pairs:
                del self._owned[pair]
                self._drop(pair)
                changed = True
        for pair in pairs:
            if pair not in self._owned:
                self._owned[pair] = self._broker.next_token()
                self._cursors.pop(pair, None)
                changed = True
        if changed:
            self._wakeup.set()

    def reset(self, pair: Pair) -> None:
        """The group's position on ``pair`` was moved: read it afresh from there."""
        if pair in self._owned:
            self._drop(pair)
            self._owned[pair] = self._broker.next_token()
            self._wakeup.set()

    # -- internals ------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(
                f"subscription of group {self.group!r} to {', '.join(self.channels)} is closed",
            )

    def _drop(self, pair: Pair) -> None:
        self._tracker.forget(*pair)
        self._cursors.pop(pair, None)
        for (channel, partition, _), redelivery in self._group.redeliveries.items():
            if redelivery.holder is self and (channel, partition) == pair:
                redelivery.holder = None

    def _take(self, delivery: Delivery) -> _Handle:
        handle = delivery.handle
        if not isinstance(handle, _Handle) or handle.member is not self:
            raise ValueError(
                f"delivery {delivery.channel}[{delivery.partition}]@{delivery.offset} was not "
                f"fetched by this subscription; settle it on the subscription that fetched it"
            )
        if handle.settled:
            raise ValueError(
                f"delivery {delivery.channel}[{delivery.partition}]@{delivery.offset} "
                f"(attempt {delivery.attempt}) is already settled; settle each delivery once"
            )
        return handle

    def _current(self, delivery: Delivery, handle: _Handle) -> bool:
        return self._owned.get((delivery.channel, delivery.partition)) == handle.epoch

    def _settle(self, delivery: Delivery, handle: _Handle) -> None:
        if not self._current(delivery, handle):
            return
        if handle.token is None:
            self._commit(delivery.channel, delivery.partition, delivery.offset)
            return
        key = (delivery.channel, delivery.partition, delivery.offset)
        redelivery = self._group.redeliveries.get(key)
        if redelivery is not None and redelivery.token == handle.token:
            del self._group.redeliveries[key]

    def _commit(self, channel: str, partition: int, offset: int) -> None:
        position = self._tracker.settle(channel, partition, offset)
        if position is not None:
            self._group.committed[(channel, partition)] = position

    def _next_due(self) -> float | None:
        due = [
            r.due
            for (c, p, _), r in self._group.redeliveries.items()
            if r.holder is None and (c, p) in self._owned
        ]
        return min(due) if due else None

    def _collect(self, limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        group = self._group
        channels = self._broker.channels
        if group.redeliveries:
            now = time.monotonic()
            ready = sorted(
                (r.due, key)
                for key, r in group.redeliveries.items()
                if r.holder is None and r.due <= now and key[:2] in self._owned
            )
            for _, key in ready[:limit]:
                channel, partition, offset = key
                redelivery = group.redeliveries[key]
                redelivery.holder = self
                redelivery.token = self._broker.next_token()
                record = channels[channel].logs[partition][offset]
                handle = _Handle(self, self._owned[(channel, partition)], redelivery.token)
                out.append(
                    Delivery(
                        channel=channel,
                        partition=partition,
                        offset=offset,
                        key=record.key,
                        headers=dict(record.headers),
                        body=record.body,
                        attempt=redelivery.attempt,
                        timestamp=record.timestamp,
                        handle=handle,
                    )
                )
        if len(out) >= limit or not self._owned:
            return out
        pairs = sorted(self._owned)
        self._rotation = (self._rotation + 1) % len(pairs)
        pairs = pairs[self._rotation :] + pairs[: self._rotation]
        for pair in pairs:
            channel, partition = pair
            log = channels[channel].logs[partition]
            cursor = self._cursors.get(pair)
            if cursor is None:
                cursor = group.committed.get(pair, 0)
            epoch = self._owned[pair]
            while cursor < len(log) and len(out) < limit:
                offset = cursor
                cursor += 1
                self._tracker.fetched(channel, partition, offset)
                if (channel, partition, offset) in group.redeliveries:
                    # Nacked before by another owner; its redelivery stands in for it.
                    self._commit(channel, partition, offset)
                    continue
                record = log[offset]
                out.append(
                    Delivery(
                        channel=channel,
                        partition=partition,
                        offset=offset,
                        key=record.key,
                        headers=dict(record.headers),
                        body=record.body,
                        attempt=1,
                        timestamp=record.timestamp,
                        handle=_Handle(self, epoch, None),
                    )
                )
            self._cursors[pair] = cursor
            if len(out) >= limit:
                break
        return out


class MemoryTransport(Transport):
    """A transport whose broker lives in this process (``memory://NAME?partitions=4``)."""

    features = Features(
        cross_process_groups=False,
        reasons={"cross_process_groups": "an in-process broker has no other processes"},
    )

    def __init__(self, name: str = "default", *, partitions: int = 4) -> None:
        problems = MemoryOptions(partitions=partitions).validate()
        if problems:
            raise ValueError(f"MemoryTransport({name!r}): {'; '.join(problems)}")
        self.name = name
        self.partitions = partitions
        self._broker: Broker | None = None
        self._subscriptions: list[MemorySubscription] = []
        self._closed = False

    @classmethod
    def from_url(cls, url: str, key: str = "NERVUS_TRANSPORT") -> MemoryTransport:
        """``memory://NAME?partitions=N``; ``key`` names the setting in errors."""
        parts = urlsplit(url)
        options = parse_options(url, MemoryOptions, key=key)
        name = (parts.netloc + parts.path).strip("/") or "default"
        return cls(name, partitions=options.partitions)

    def __repr__(self) -> str:
        return f"MemoryTransport('memory://{self.name}?partitions={self.partitions}')"

    async def connect(self) -> None:
        self._check_open()
        if self._broker is None:
            self._broker = broker_named(self.name)

    async def ensure_channel(self, channel: str, partitions: int | None = None) -> int:
        broker = self._connected()
        _check_name("channel", channel)
        if partitions is not None and partitions < 1:
            raise ValueError(f"ensure_channel({channel!r}, partitions={partitions}): must be 1+")
        return len(broker.channel(channel, partitions or self.partitions).logs)

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        broker = self._connected()
        _check_name("channel", channel)
        log = broker.channel(channel, self.partitions)
        count = len(log.logs)
        for message in messages:
            partition = partition_for(message.key, count, log.counter)
            if message.key is None:
                log.counter += 1
            broker.append(log, partition, message.key, message.headers, message.body)
        if messages:
            broker.notify(channel)
        await asyncio.sleep(0)

    async def subscribe(
        self,
        channels: Iterable[str],
        group: str,
        *,
        max_in_flight: int = 1000,
        start: Start | None = None,
    ) -> Subscription:
        broker = self._connected()
        names = tuple(dict.fromkeys(channels))
        if not names:
            raise ValueError(f"subscribe(group={group!r}): name at least one channel")
        for name in names:
            _check_name("channel", name)
            broker.channel(name, self.partitions)
        _check_name("group", group)
        if max_in_flight < 1:
            raise ValueError(f"subscribe(max_in_flight={max_in_flight}): must be 1 or more")
        state = broker.group(group)
        if start is not None and start.kind != "committed":
            _move_positions(broker, state, names, start)
        member = MemorySubscription(self, broker, state, names)
        state.members.append(member)
        self._subscriptions.append(member)
        broker.rebalance(state)
        return member

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.close()

    def forget(self, subscription: MemorySubscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"transport memory://{self.name} is closed")

    def _connected(self) -> Broker:
        self._check_open()
        if self._broker is None:
            raise TransportError(
                f"transport memory://{self.name} is not connected; "
                "await connect() first or use it as 'async with transport:'"
            )
        return self._broker


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} name {name!r}: must be a non-empty string")


def _move_positions(broker: Broker, group: Group, channels: tuple[str, ...], start: Start) -> None:
    """Move ``group``'s positions on ``channels`` as ``start`` says (a replay)."""
    if start.kind == "offsets":
        unknown = sorted(set(start.offsets or {}) - set(channels))
        if unknown:
            raise ValueError(
                f"Start.at names channels {unknown} that the subscription does not read "
                f"({', '.join(channels)})"
            )
    for name in channels:
        logs = broker.channels[name].logs
        for partition, log in enumerate(logs):
            if start.kind == "beginning":
                position = 0
            elif start.kind == "end":
                position = len(log)
            elif start.kind == "time":
                if start.time is None:
                    raise ValueError("Start(kind='time') needs a time; use Start.at_time(ts)")
                position = bisect.bisect_left(log, start.time, key=lambda r: r.timestamp)
            else:
                wanted = (start.offsets or {}).get(name, {})
                if partition not in wanted:
                    continue
                position = wanted[partition]
                if position < 0:
                    raise ValueError(f"Start.at: offset {position} of {name}[{partition}] < 0")
                position = min(position, len(log))
            group.committed[(name, partition)] = position
            for member in group.members:
                member.reset((name, partition))
        if start.kind == "offsets":
            bad = sorted(p for p in (start.offsets or {}).get(name, {}) if p >= len(logs))
            if bad:
                raise ValueError(
                    f"Start.at: channel {name!r} has {len(logs)} partitions; no partition {bad}"
                )
