"""Who is in a consumer group: members announce themselves on the group's fanout
exchange; each member computes the same partition targets from the members alive."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Mapping

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from nervus.transports.rabbitmq import _names


def target_owner(members: list[str], channel: str, partition: int) -> str:
    """The member a partition belongs to: spread round-robin from a per-channel shift,
    so one-partition channels do not all land on the first member (as on SQLite)."""
    shift = zlib.crc32(channel.encode())
    return members[(partition + shift) % len(members)]


def targets(
    me: str, live: Mapping[str, frozenset[str]], channels: Mapping[str, int]
) -> set[tuple[str, int]]:
    """The ``(channel, partition)`` pairs ``me`` should own among the ``live`` members
    (member -> channels it reads)."""
    wanted: set[tuple[str, int]] = set()
    for name, count in channels.items():
        candidates = sorted(m for m, chans in live.items() if name in chans)
        if me not in candidates:
            continue
        for p in range(count):
            if target_owner(candidates, name, p) == me:
                wanted.add((name, p))
    return wanted


class Members:
    """The members of one group as this member sees them.

    Announcements arrive on an exclusive queue bound to the group's fanout exchange.
    A member is alive until ``session`` seconds pass without an announcement from
    it, or until it announces that it leaves. ``changed`` is set whenever the set
    of members changes.
    """

    def __init__(self, group: str, member: str, channels: frozenset[str], session: float) -> None:
        self.group = group
        self.member = member
        self.channels = channels
        self.session = session
        self.changed = asyncio.Event()
        self._seen: dict[str, tuple[float, frozenset[str]]] = {}
        self._exchange: AbstractExchange | None = None
        self._channel: AbstractChannel | None = None

    async def start(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._exchange = await channel.declare_exchange(
            _names.members_exchange(self.group), aio_pika.ExchangeType.FANOUT, durable=False
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self._exchange)
        await queue.consume(self._on_announcement, no_ack=True)
        await self.announce()

    async def announce(self, *, leaving: bool = False) -> None:
        if self._exchange is None:
            return
        body = {"member": self.member, "channels": sorted(self.channels), "leaving": leaving}
        await self._exchange.publish(aio_pika.Message(json.dumps(body).encode()), "")

    async def _on_announcement(self, message: AbstractIncomingMessage) -> None:
        try:
            data = json.loads(message.body)
            member = str(data["member"])
            channels = frozenset(str(c) for c in data["channels"])
            leaving = bool(data.get("leaving"))
        except (ValueError, KeyError, TypeError):
            return  # not an announcement of ours
        if member == self.member:
            return
        if leaving:
            if self._seen.pop(member, None) is not None:
                self.changed.set()
            return
        known = self._seen.get(member)
        self._seen[member] = (time.monotonic() + self.session, channels)
        if known is None or known[1] != channels:
            self.changed.set()
            if known is None:
                # let the newcomer know about us at once
                await self.announce()

    def live(self) -> dict[str, frozenset[str]]:
        """Members alive now (this one included), with the channels each reads."""
        now = time.monotonic()
        gone = [m for m, (until, _) in self._seen.items() if until < now]
        for m in gone:
            del self._seen[m]
        alive = {m: chans for m, (_, chans) in self._seen.items()}
        alive[self.member] = self.channels
        return alive
