"""A member of a consumer group on NATS JetStream.

Each owned partition is read through the group's durable pull consumer of that
partition. Pull requests go out only for what a fetch may return: at most
``max_messages`` (and ``max_in_flight``) minus what was already requested or
received, at most one request per partition at a time, expiring with the fetch's
timeout (capped at half a second); every answer comes to one inbox of the member.
A request is over when its batch has come, when the server's status says so, or
shortly after its expiry even without a status (the server may end an expired
request silently), so no partition stays unread while a fetch waits.

Settling: the consumers acknowledge explicitly, message by message. An ack is a
fire-and-forget protocol message pipelined on the connection (no round trip); a nack
is a server-side ``-NAK`` with the delay (the server keeps it: durable once the
server confirmed it, which the call waits for), a dead-letter publishes the copy
then terminates the message (``+TERM``). Explicit acknowledgement is what keeps
settlement in any order correct: an ``AckPolicy.ALL`` ack of a later message would
settle an earlier nacked one with it. The server keeps the per-message state, so
there is no contiguous position to track on the client.

Deliveries held (fetched or received, not yet settled) are kept alive by a
``+WPI`` (work in progress) every heartbeat, so ``ack_wait`` only runs out for the
messages of a member that died; the server then delivers them to the partition's
next owner. A member that loses a partition, or closes, gives back what it holds
of it at once with ``-NAK``.

While the connection is down (the client reconnects by itself) a member sends no
pull requests and does not renew its lease; a fetch returns what is already held,
else waits its timeout for the reconnect and then raises ``TransportUnavailable``
(the runtime retries with backoff). Acknowledgements wait in the client's buffer and
go out on reconnect. Once reconnected, the next renewal says which partitions are
still this member's and fetching resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsClientSubscription

from nervus.errors import TransportError
from nervus.transports._contract import (
    DeadLetterReason,
    Delivery,
    Subscription,
    dead_letter_channel,
    dead_letter_message,
    ensure_open,
)
from nervus.transports.nats._headers import KEY_HEADER, from_nats
from nervus.transports.nats._membership import GroupStore, Pair
from nervus.transports.nats._names import partition_subject

if TYPE_CHECKING:
    from nervus.transports.nats._transport import NatsTransport

log = logging.getLogger("nervus.transports.nats")

_LONGEST_PULL = 0.5  # seconds a pull request may wait on the server
_EXPIRY_GRACE = 1.0  # after this past its expiry, a request that never answered is over
_PULL_AGAIN = 0.02
"""After this past its expiry, a pull request that never answered is taken as over
and its partition asked again. The server usually answers an expired request with a
408 status, but it drops one silently when a message comes in after the expiry and
before its expiry timer ran: waiting for the status would leave the partition
unread, messages piling up, until the grace above. Asking again while the old
request is in fact still open only lets the server send the rest of that request
as well: it stays bounded by the consumer's ``max_ack_pending``."""
_BLOCKED = 0.5  # pause of a partition whose consumer answered with an error
_ACK = b"+ACK"
_NAK = b"-NAK"
_TERM = b"+TERM"
_PROGRESS = b"+WPI"


class _Pull:
    """A pull request still open on the server."""

    __slots__ = ("expires", "remaining", "token")

    def __init__(self, token: str, remaining: int, expires: float) -> None:
        self.token = token
        self.remaining = remaining
        self.expires = expires


class OwnedPartition:
    """A partition this member owns, read through the group's consumer of it; also
    the ``handle`` of its deliveries."""

    __slots__ = (
        "blocked_until",
        "channel",
        "consumer",
        "next_subject",
        "part",
        "pull",
        "returning",
        "revoked",
        "stream",
        "subject",
    )

    def __init__(
        self, channel: str, part: int, subject: str, stream: str, consumer: str, api: str
    ) -> None:
        self.channel = channel
        self.part = part
        self.subject = subject
        self.stream = stream
        self.consumer = consumer
        self.next_subject = f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.pull: _Pull | None = None
        self.blocked_until = 0.0
        self.revoked = False
        self.returning: list[str] = []  # replies to give back once the open pull is over


class NatsSubscription(Subscription):
    """Owns partitions by lease (see ``_membership``) and reads them through the
    group's durable pull consumers."""

    def __init__(
        self,
        transport: NatsTransport,
        group: str,
        channels: Mapping[str, int],
        member: str,
        max_in_flight: int,
    ) -> None:
        self.group = group
        self.channels = tuple(channels)
        self._transport = transport
        self._settings = transport.settings
        self._counts = dict(channels)
        self._member = member
        self._max_in_flight = max_in_flight
        self._store = GroupStore(transport.bucket, group)
        self._nc = transport.client
        self._api = "$JS.API"
        self._owned: dict[Pair, OwnedPartition] = {}
        self._by_subject: dict[str, OwnedPartition] = {}
        self._by_token: dict[str, OwnedPartition] = {}
        self._returning: set[OwnedPartition] = set()
        self._buffer: deque[tuple[OwnedPartition, Msg]] = deque()
        self._unsettled: dict[tuple[str, int, int], str] = {}
        self._arrived = asyncio.Event()
        self._tokens = itertools.count()
        self._inbox = self._nc.new_inbox()
        self._inbox_sub: NatsClientSubscription | None = None
        self._generation = -1
        self._rotation = 0
        self._closed = False
        self._lease_task: asyncio.Task[None] | None = None
        self._renewed_at = time.monotonic()

    @property
    def member(self) -> str:
        """This member's id in the group (host, process and a random part)."""
        return self._member

    async def start(self) -> None:
        self._inbox_sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_message)
        try:
            await self._renew()
        except BaseException:
            await self._inbox_sub.unsubscribe()
            raise
        self._lease_task = asyncio.create_task(self._lease_loop())

    def _check(self) -> None:
        if self._closed or self._transport.closed:
            ensure_open(True, f"subscription of group {self.group!r}")

    def wake(self) -> None:
        """Wake a waiting fetch (the connection is back: pull again now)."""
        self._arrived.set()

    # -- receiving --------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        if not msg.reply:  # a status: the pull request named by the subject is over
            token = msg.subject[len(self._inbox) + 1 :]
            owner = self._by_token.pop(token, None)
            if owner is not None and owner.pull is not None and owner.pull.token == token:
                owner.pull = None
                if owner.revoked:
                    await self._give_back_all(owner)
                    return
                status = (msg.headers or {}).get("Status", "")
                if status not in ("404", "408"):
                    # consumer deleted (a replay elsewhere), or another refusal
                    log.info(
                        "pull from %s of %s answered %s %s",
                        owner.consumer,
                        owner.stream,
                        status,
                        (msg.headers or {}).get("Description", ""),
                    )
                    owner.blocked_until = time.monotonic() + _BLOCKED
                    self._transport.forget_consumer(owner.stream, owner.consumer)
                self._arrived.set()
            return
        owner = self._by_subject.get(msg.subject)
        if owner is None:  # no request of this member can have asked for it
            await self._give_back(msg.reply)
            return
        pull = owner.pull
        if pull is not None:
            pull.remaining -= 1
            if pull.remaining <= 0:
                owner.pull = None
                self._by_token.pop(pull.token, None)
        if owner.revoked:
            owner.returning.append(msg.reply)
            if owner.pull is None:
                await self._give_back_all(owner)
            return
        self._buffer.append((owner, msg))
        self._arrived.set()

    async def _give_back(self, reply: str) -> None:
        with contextlib.suppress(nats.errors.Error):
            await self._nc.publish(reply, _NAK)

    async def _give_back_all(self, owner: OwnedPartition) -> None:
        """Give back what this member held of a revoked partition, now that no pull
        request of this member can take it again (it would sit unseen until ack_wait)."""
        self._returning.discard(owner)
        if self._by_subject.get(owner.subject) is owner:
            del self._by_subject[owner.subject]
        returning, owner.returning = owner.returning, []
        for reply in returning:
            await self._give_back(reply)

    async def _expire_returns(self, force: bool = False) -> None:
        """Give back for revoked partitions whose pull request is over (or never answered)."""
        now = time.monotonic()
        for owner in list(self._returning):
            pull = owner.pull
            if force or pull is None or pull.expires + _EXPIRY_GRACE < now:
                if pull is not None:
                    self._by_token.pop(pull.token, None)
                    owner.pull = None
                await self._give_back_all(owner)

    # -- fetching ---------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        self._check()
        if max_messages <= 0:
            return []
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            out = await self._take(max_messages)
            if out or self._closed:
                return out
            self._arrived.clear()
            if not self._nc.is_connected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._transport.unavailable(f"fetching for group {self.group!r}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()  # woken on reconnect
                self._check()
                continue
            await self._pull(max_messages, deadline)
            if self._buffer:
                continue
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return []
            # Wake when a message or status comes, else when an open request may
            # have ended without a status (see _PULL_AGAIN), to ask again.
            wait = min(remaining, self._settings.check_interval * 5, self._next_pull_over() - now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.001)):
                    await self._arrived.wait()
            self._check()

    def _next_pull_over(self) -> float:
        """When the first open pull request is taken as over without a status."""
        ends = [o.pull.expires for o in self._owned.values() if o.pull is not None]
        return min(ends) + _PULL_AGAIN if ends else math.inf

    def _lease_valid(self) -> bool:
        # Not renewed within a lease: another member may own these partitions now,
        # so hand out nothing until the next renewal says what is still ours.
        return time.monotonic() - self._renewed_at <= self._settings.lease_seconds

    async def _take(self, limit: int) -> list[Delivery]:
        if not self._buffer or not self._lease_valid():
            return []
        out: list[Delivery] = []
        buffer, owned, unsettled = self._buffer, self._owned, self._unsettled
        while buffer and len(out) < limit:
            handle, msg = buffer.popleft()
            reply = msg.reply
            if owned.get((handle.channel, handle.part)) is not handle:
                await self._give_back(reply)  # revoked: only after its pull was over
                continue
            tokens = reply.split(".")
            base = 2 if len(tokens) == 9 else 4  # $JS.ACK.[domain.account.]stream.consumer...
            delivered, sequence, stamp = tokens[base + 2], tokens[base + 3], tokens[base + 5]
            offset = int(sequence)
            key = (handle.channel, handle.part, offset)
            if key in unsettled:
                # redelivered while still held here (the server's ack_wait ran out)
                unsettled[key] = reply
                continue
            unsettled[key] = reply
            headers = from_nats(msg.headers)
            out.append(
                Delivery(
                    handle.channel,
                    handle.part,
                    offset,
                    headers.get(KEY_HEADER),
                    headers,
                    msg.data,
                    int(delivered),
                    int(stamp) / 1e9,
                    handle,
                )
            )
        return out

    async def _pull(self, limit: int, deadline: float) -> None:
        """Ask the owned partitions without an open request for up to what a fetch
        may still return."""
        if not self._owned or not self._lease_valid() or not self._nc.is_connected:
            return  # while reconnecting, a request would only wait in the client's buffer
        now = time.monotonic()
        owned = list(self._owned.values())
        asked = 0
        idle: list[OwnedPartition] = []
        for o in owned:
            pull = o.pull
            if pull is not None and pull.expires + _PULL_AGAIN <= now:
                self._by_token.pop(pull.token, None)
                o.pull = pull = None
            if pull is not None:
                asked += pull.remaining
            elif o.blocked_until <= now:
                idle.append(o)
        room = min(limit, self._max_in_flight - len(self._unsettled))
        capacity = room - len(self._buffer) - asked
        if capacity <= 0 or not idle:
            return
        self._rotation = (self._rotation + 1) % len(idle)
        idle = idle[self._rotation :] + idle[: self._rotation]
        idle = idle[:capacity]
        share, extra = divmod(capacity, len(idle))
        wait = min(deadline - now, _LONGEST_PULL)
        for i, o in enumerate(idle):
            batch = share + (1 if i < extra else 0)
            token = str(next(self._tokens))
            if wait >= 0.002:
                request = {"batch": batch, "expires": int(wait * 1e9)}
                expires = now + wait
            else:
                request = {"batch": batch, "no_wait": True}
                expires = now
            o.pull = _Pull(token, batch, expires)
            self._by_token[token] = o
            await self._nc.publish(
                o.next_subject, json.dumps(request).encode(), reply=f"{self._inbox}.{token}"
            )

    # -- settling ---------------------------------------------------------------

    def _reply_of(self, d: Delivery, pop: bool) -> str | None:
        key = (d.channel, d.partition, d.offset)
        reply = self._unsettled.pop(key, None) if pop else self._unsettled.get(key)
        if reply is None and not isinstance(d.handle, OwnedPartition):
            raise ValueError(
                f"delivery {d.channel}[{d.partition}]@{d.offset} was not fetched from this "
                "NATS subscription; settle a delivery on the subscription that fetched it"
            )
        return reply

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self._check()
        publish = self._nc.publish
        # No waiting for the connection: while it is down the client buffers the acks.
        async with self._transport.requests(f"acknowledging for group {self.group!r}", wait=False):
            for d in deliveries:
                reply = self._reply_of(d, pop=True)
                if reply is not None:  # else settled already, or given back
                    await publish(reply, _ACK)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        self._check()
        reply = self._reply_of(delivery, pop=False)
        if reply is None:
            return  # given back when its partition was revoked: delivered again anyway
        payload = _NAK if delay <= 0 else _NAK + b' {"delay": %d}' % int(delay * 1e9)
        async with self._transport.requests(
            f"nacking {delivery.channel}[{delivery.partition}]@{delivery.offset}",
            delivery.channel,
        ):
            await self._nc.request(reply, payload, timeout=self._settings.request_timeout)
        self._unsettled.pop((delivery.channel, delivery.partition, delivery.offset), None)

    async def dead_letter(self, delivery: Delivery, reason: DeadLetterReason) -> None:
        self._check()
        self._reply_of(delivery, pop=False)  # raises for a foreign delivery
        await self._transport.publish(
            dead_letter_channel(delivery.channel, self.group),
            [dead_letter_message(delivery, self.group, reason)],
        )
        reply = self._unsettled.get((delivery.channel, delivery.partition, delivery.offset))
        if reply is None:
            return
        async with self._transport.requests(
            f"terminating {delivery.channel}[{delivery.partition}]@{delivery.offset}",
            delivery.channel,
        ):
            await self._nc.request(reply, _TERM, timeout=self._settings.request_timeout)
        self._unsettled.pop((delivery.channel, delivery.partition, delivery.offset), None)

    def assignment(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._owned)

    # -- membership -------------------------------------------------------------

    async def _lease_loop(self) -> None:
        heartbeat = self._settings.heartbeat
        check = self._settings.check_interval
        next_renewal = time.monotonic() + heartbeat
        while not self._closed:
            await asyncio.sleep(check)
            if self._closed:
                break
            if not self._nc.is_connected:
                # The transport reported the outage; renew as soon as it is back.
                next_renewal = 0.0
                continue
            try:
                if self._returning:
                    await self._expire_returns()
                generation = await self._store.generation()
                now = time.monotonic()
                if generation != self._generation or now >= next_renewal:
                    waiting = await self._renew()
                    await self._keep_alive()
                    next_renewal = time.monotonic() + (check * 3 if waiting else heartbeat)
                elif any(o.blocked_until and o.blocked_until <= now for o in self._owned.values()):
                    await self._reacquire_consumers()
            except asyncio.CancelledError:
                raise
            except Exception:
                if not self._nc.is_connected:  # cut by an outage the transport reports
                    next_renewal = 0.0
                    continue
                log.warning(
                    "renewing the lease of %s in group %r failed; retrying",
                    self._member,
                    self.group,
                    exc_info=True,
                )

    async def _renew(self) -> bool:
        started = time.monotonic()
        async with self._transport.requests(f"renewing the lease in group {self.group!r}"):
            outcome = await self._store.renew(
                member=self._member, channels=self._counts, lease=self._settings.lease_seconds
            )
        if self._closed:
            return False
        for pair in [p for p in self._owned if p not in outcome.owned]:
            await self._revoke(pair)
        namespace = self._settings.namespace
        for channel, part in sorted(outcome.owned - set(self._owned)):
            stream, consumer = await self._transport.ensure_consumer(
                channel, self.group, part, self._max_in_flight
            )
            if self._closed:
                return False
            subject = partition_subject(namespace, channel, part)
            previous = self._by_subject.get(subject)
            if previous is not None:  # given up and taken again before its pull was over
                await self._give_back_all(previous)
            owned = OwnedPartition(channel, part, subject, stream, consumer, self._api)
            self._owned[(channel, part)] = owned
            self._by_subject[subject] = owned
        self._renewed_at = started
        self._generation = outcome.generation
        if outcome.owned:
            self._arrived.set()
        return outcome.waiting

    async def _reacquire_consumers(self) -> None:
        """Recreate the consumers that answered with an error (deleted by a replay)."""
        for o in list(self._owned.values()):
            if o.blocked_until:
                await self._transport.ensure_consumer(
                    o.channel, self.group, o.part, self._max_in_flight
                )
                o.blocked_until = 0.0

    async def _revoke(self, pair: Pair) -> None:
        """Stop reading a partition and give back what this member holds of it: at
        once when no pull request of this member is open on it, else when that
        request is over (what it still brings is given back too)."""
        owned = self._owned.pop(pair)
        owned.revoked = True
        held = [k for k in self._unsettled if (k[0], k[1]) == pair]
        owned.returning.extend(self._unsettled.pop(key) for key in held)
        kept: list[tuple[OwnedPartition, Msg]] = []
        for handle, msg in self._buffer:
            if handle is owned:
                owned.returning.append(msg.reply)
            else:
                kept.append((handle, msg))
        # in place: a fetch handing out the buffer meanwhile must see the change
        self._buffer.clear()
        self._buffer.extend(kept)
        if owned.pull is None:
            await self._give_back_all(owned)
        else:
            self._returning.add(owned)

    async def _keep_alive(self) -> None:
        """Tell the server the held deliveries are being worked on (resets ack_wait)."""
        publish = self._nc.publish
        for reply in list(self._unsettled.values()):
            await publish(reply, _PROGRESS)
        for _, msg in list(self._buffer):
            await publish(msg.reply, _PROGRESS)

    # -- closing ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._lease_task
            self._lease_task = None
        self._transport.forget_subscription(self)
        self._arrived.set()
        try:
            for pair in list(self._owned):
                await self._revoke(pair)
            for reply in self._unsettled.values():
                await self._give_back(reply)
            self._unsettled.clear()
            # Open pull requests would take what is given back and hide it until
            # ack_wait; they end within their expiry (at most _LONGEST_PULL).
            give_up = time.monotonic() + _LONGEST_PULL + _EXPIRY_GRACE
            while self._returning and time.monotonic() < give_up:
                await asyncio.sleep(0.01)
                await self._expire_returns()
            await self._expire_returns(force=True)
            if self._inbox_sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await self._inbox_sub.unsubscribe()
            async with self._transport.requests(f"leaving group {self.group!r}"):
                await self._nc.flush(timeout=math.ceil(self._settings.request_timeout))
                await self._store.leave(self._member)
        except TransportError:
            log.warning("leaving group %r cleanly failed", self.group, exc_info=True)
