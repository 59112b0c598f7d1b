"""A member of a Kafka consumer group, with durable delayed redelivery through a
per-group retry topic.

Threads: a librdkafka consumer must not be called from two threads at once, so
every call on this member's consumers (and the rebalance and commit callbacks they
run) happens on one thread of its own, the *serving thread*, for as long as the
subscription is open. It reads ahead into a buffer of at most ``max_in_flight``
deliveries, which ``fetch`` takes from on the event loop; it commits settled
positions (``ack`` only records them, under a lock); and it keeps serving the
group while the caller is not fetching: when the buffer stays full for ``HOLD``
seconds it pauses every assigned partition and goes on polling, so a rebalance is
served (and a joining member gets its partitions) however slow the handlers are.
Pausing drops what librdkafka read ahead for those partitions; it reads them
again from the next undelivered offset once the buffer has room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from nervus.errors import TransportError, TransportUnavailable
from nervus.transports._contract import (
    DeadLetterReason,
    Delivery,
    OffsetTracker,
    OutgoingMessage,
    Start,
    Subscription,
    dead_letter_channel,
    dead_letter_message,
    ensure_open,
)
from nervus.transports.kafka._reachability import CONNECTIVITY

if TYPE_CHECKING:
    from nervus.transports.kafka._transport import KafkaTransport

log = logging.getLogger("nervus.transports.kafka")

ATTEMPT = "nervus_attempt"
NOT_BEFORE = "nervus_not_before"
ORIGIN_CHANNEL = "nervus_origin_channel"
ORIGIN_PARTITION = "nervus_origin_partition"
ORIGIN_OFFSET = "nervus_origin_offset"
ORIGIN_TIMESTAMP = "nervus_origin_timestamp"

SLICE = 0.1
"""Longest single wait of the serving thread: due retries, commits, a full buffer
and close are looked at least this often."""

HOLD = 0.2
"""How long the buffer may stay full before the serving thread pauses the member's
partitions to keep serving the group without reading more."""

FAILURE_BACKOFF = 0.5
"""How long the serving thread waits after a consumer call failed, before the next."""

Key = tuple[str, int]


def retry_topic(channel: str, group: str) -> str:
    """The topic holding ``group``'s delayed redeliveries of ``channel``; its
    partition ``p`` holds those of the channel's partition ``p``."""
    return f"{channel}.{group}.retry"


def retry_group(group: str) -> str:
    """The consumer group id under which ``group``'s retry topic positions are stored."""
    return f"{group}.retry"


class Ownership:
    """One period of ownership of a partition; the ``handle`` of its deliveries, so a
    delivery fetched before a partition was revoked (and maybe reassigned) is
    recognised as stale."""

    __slots__ = ("key",)

    def __init__(self, topic: str, partition: int) -> None:
        self.key: Key = (topic, partition)


class RetryHandle:
    """The ``handle`` of a redelivery: where its copy sits in the retry topic."""

    __slots__ = ("key", "offset", "owner")

    def __init__(self, owner: Ownership, topic: str, partition: int, offset: int) -> None:
        self.owner = owner
        self.key: Key = (topic, partition)
        self.offset = offset


class _Fetched(Protocol):
    """A message ``consume`` returned from an assigned partition: its position is set.
    (A header value may be None, which the conversion catches.)"""

    def error(self) -> KafkaError | None: ...
    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...
    def timestamp(self) -> tuple[int, int]: ...


class KafkaSubscription(Subscription):
    """Fetches from the partitions the group assigns this member, and from the same
    partitions of the group's retry topics; commits settled positions in batches
    (at most every ``commit_interval`` seconds without waiting for the broker;
    synchronously on revoke and on close)."""

    def __init__(
        self,
        transport: KafkaTransport,
        group: str,
        channels: Sequence[str],
        *,
        max_in_flight: int,
        start: Start | None,
    ) -> None:
        self.group = group
        self.channels = tuple(channels)
        self._transport = transport
        self._settings = transport.settings
        self._max_in_flight = max_in_flight
        self._start = start if start is not None else Start.committed()
        self._retry_topics = {c: retry_topic(c, group) for c in self.channels}
        self._origins = {r: c for c, r in self._retry_topics.items()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._finished: Future[None] = Future()
        # shared between the loop and the serving thread, under _lock
        self._lock = threading.Lock()
        self._owned: dict[Key, Ownership] = {}
        self._tracker = OffsetTracker()
        self._positions: dict[Key, int] = {}
        self._assignment: frozenset[Key] = frozenset()
        self._failure: TransportError | None = None
        self._buffer: list[Delivery] = []
        self._waiter: asyncio.Future[None] | None = None
        self._stopping = threading.Event()
        self._room = threading.Event()  # set by fetch when it took from the buffer
        # the serving thread's own
        self._consumer: Consumer | None = None
        self._retries: Consumer | None = None
        self._held: dict[Key, tuple[float, Message]] = {}
        self._started: set[Key] = set()
        self._committing: dict[Key, int] = {}
        self._last_commit = 0.0
        self._full_since: float | None = None
        self._paused: set[Key] = set()
        # the event loop's own
        self._closed = False

    async def start(self) -> None:
        """Create the consumers and join the group; the serving thread takes the
        assignment and reads ahead from then on."""
        self._loop = asyncio.get_running_loop()
        opened: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._serve, args=(opened,), name="nervus-kafka-consumer", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(opened)

    # -- fetching ---------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        self._check()
        if max_messages <= 0:
            return []
        buffer = self._buffer
        if not buffer:
            if timeout > 0:
                await self._wait_for_deliveries(timeout)
            self._check()
            if not buffer:
                return []
        # The serving thread drops the deliveries of a revoked partition from the
        # buffer under the lock, so what is taken here is owned right now.
        with self._lock:
            if len(buffer) <= max_messages:
                out = buffer.copy()
                buffer.clear()
            else:
                out = buffer[:max_messages]
                del buffer[:max_messages]
        self._room.set()
        return out

    async def _wait_for_deliveries(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        with self._lock:
            if self._buffer or self._failure is not None:
                return
            self._waiter = waiter
        timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            with self._lock:
                if self._waiter is waiter:
                    self._waiter = None

    def _check(self) -> None:
        ensure_open(self._closed, f"Kafka subscription of group {self.group!r}")
        if self._failure is not None:
            with self._lock:
                failure, self._failure = self._failure, None
            if failure is not None:
                raise failure

    # -- settling ---------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        ensure_open(self._closed, f"Kafka subscription of group {self.group!r}")
        with self._lock:
            owned, settle, positions = self._owned, self._tracker.settle, self._positions
            last: object = None
            live = False
            for d in deliveries:
                handle = d.handle
                if type(handle) is not Ownership:
                    self._settle(d)
                    continue
                if handle is not last:  # a run of one partition is looked up once
                    last, live = handle, owned.get(handle.key) is handle
                if live:  # else revoked since: the partition's next owner delivers it again
                    key = handle.key
                    position = settle(key[0], key[1], d.offset)
                    if position is not None:
                        positions[key] = position

    def _settle(self, d: Delivery) -> None:
        """Mark ``d`` settled (the caller holds ``_lock``); stale deliveries change nothing."""
        handle = d.handle
        if type(handle) is Ownership:
            key, offset = handle.key, d.offset
        elif type(handle) is RetryHandle:
            key, offset, handle = handle.key, handle.offset, handle.owner
        else:
            raise ValueError(_foreign(d))
        if self._owned.get(key) is not handle:
            return  # revoked since: the partition's next owner delivers it again
        position = self._tracker.settle(key[0], key[1], offset)
        if position is not None:
            self._positions[key] = position

    def _still_owned(self, d: Delivery) -> bool:
        if not isinstance(d.handle, (Ownership, RetryHandle)):
            raise ValueError(_foreign(d))
        with self._lock:
            return self._owned.get(_key(d)) is _owner(d)

    async def nack(self, delivery: Delivery, delay: float) -> None:
        ensure_open(self._closed, f"Kafka subscription of group {self.group!r}")
        if not self._still_owned(delivery):
            return  # revoked: the next owner delivers it again from the committed position
        due = time.time() + max(delay, 0.0)
        headers = dict(delivery.headers)
        headers[ATTEMPT] = str(delivery.attempt + 1)
        headers[NOT_BEFORE] = repr(due)
        headers[ORIGIN_CHANNEL] = delivery.channel
        headers[ORIGIN_PARTITION] = str(delivery.partition)
        headers[ORIGIN_OFFSET] = str(delivery.offset)
        headers[ORIGIN_TIMESTAMP] = repr(delivery.timestamp)
        copy = OutgoingMessage(key=delivery.key, headers=headers, body=delivery.body)
        await self._transport.publisher.send(
            self._retry_topics[delivery.channel], [copy], partition=delivery.partition
        )
        with self._lock:
            self._settle(delivery)

    async def dead_letter(self, delivery: Delivery, reason: DeadLetterReason) -> None:
        ensure_open(self._closed, f"Kafka subscription of group {self.group!r}")
        if not self._still_owned(delivery):
            return  # revoked: the next owner delivers it again from the committed position
        await self._transport.publish(
            dead_letter_channel(delivery.channel, self.group),
            [dead_letter_message(delivery, self.group, reason)],
        )
        with self._lock:
            self._settle(delivery)

    def assignment(self) -> frozenset[tuple[str, int]]:
        return self._assignment

    # -- closing ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._room.set()
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _resolve(waiter)
        self._transport.forget_subscription(self)
        if self._thread is not None:
            await asyncio.wrap_future(self._finished)

    # == on the serving thread ===================================================

    def _serve(self, opened: Future[None]) -> None:
        try:
            self._open()
        except BaseException as exc:
            opened.set_exception(exc)
            self._finished.set_result(None)
            return
        opened.set_result(None)
        try:
            while not self._stopping.is_set():
                try:
                    self._turn()
                except KafkaException as exc:
                    self._fail(self._fetch_error(exc))
                    self._stopping.wait(FAILURE_BACKOFF)
                except Exception as exc:  # never leave the member unserved
                    log.exception("serving the Kafka consumer of group %r failed", self.group)
                    self._fail(
                        TransportError(f"the Kafka consumer of group {self.group!r} failed: {exc}")
                    )
                    self._stopping.wait(FAILURE_BACKOFF)
        finally:
            try:
                self._shutdown()
            except Exception:
                log.exception("closing the Kafka consumer of group %r failed", self.group)
            finally:
                self._finished.set_result(None)

    def _open(self) -> None:
        settings, group = self._settings, self.group
        config = self._transport.reachability.client_config
        main = settings.consumer_config(log, group, self._max_in_flight)
        main["on_commit"] = self._on_commit
        retry = settings.retry_consumer_config(log, retry_group(group), self._max_in_flight)
        retry["on_commit"] = self._on_commit
        self._consumer = Consumer(config(main))
        self._retries = Consumer(config(retry))
        self._consumer.subscribe(
            list(self.channels),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _turn(self) -> None:
        """One round: commit what is due, then read into the buffer (or, while it is
        full, wait for room and keep serving the group)."""
        consumer = self._consumer
        assert consumer is not None
        if self._positions and (
            time.monotonic() - self._last_commit >= self._settings.commit_interval
        ):
            self._commit_pending(wait=False)
        room = self._max_in_flight - len(self._buffer)
        if room <= 0:
            self._hold(consumer)
            return
        self._full_since = None
        if self._paused:
            self._resume(consumer)
        ready = self._take_retries(room)
        room -= len(ready)
        messages: list[Message] = []
        if room > 0:
            first = consumer.poll(0.0 if ready else self._wait())
            if first is not None:
                messages.append(first)
                if room > 1:
                    messages += consumer.consume(room - 1, 0)
        if ready or messages:
            self._admit(ready, messages)

    def _idle_wait(self) -> float:
        """The longest wait in a consumer call: ``ack`` cannot interrupt it, so settled
        positions are looked at this often."""
        return min(SLICE, max(self._settings.commit_interval, 0.005))

    def _wait(self) -> float:
        wait = self._idle_wait()
        if self._held:
            wait = min(wait, min(due for due, _ in self._held.values()) - time.time())
        return max(wait, 0.0)

    def _hold(self, consumer: Consumer) -> None:
        """The buffer is full: wait for ``fetch`` to take from it; past ``HOLD`` s,
        pause every assigned partition and poll, which serves rebalances."""
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        self._room.clear()
        if len(self._buffer) < self._max_in_flight:
            return  # taken from meanwhile
        waited = now - self._full_since
        if waited < HOLD:
            self._room.wait(min(HOLD - waited, self._idle_wait()))
            return
        assigned = consumer.assignment()
        fresh = [tp for tp in assigned if (tp.topic, tp.partition) not in self._paused]
        if fresh:
            consumer.pause(fresh)
            self._paused.update((tp.topic, tp.partition) for tp in fresh)
        m = consumer.poll(self._idle_wait())
        if m is None:
            return
        error = m.error()
        if error is not None:
            self._consumer_error(error)
            return
        # From a partition assigned during the poll, read before it could be paused:
        # kept (one over the bound at most, per partition so assigned), and the
        # partition paused with the others.
        topic, part = m.topic(), m.partition()
        assert topic is not None and part is not None
        consumer.pause([TopicPartition(topic, part)])
        self._paused.add((topic, part))
        self._admit([], [m])

    def _resume(self, consumer: Consumer) -> None:
        assigned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        keys = [k for k in self._paused if k in assigned]
        self._paused.clear()
        if keys:
            consumer.resume([TopicPartition(t, p) for t, p in keys])

    def _admit(self, ready: list[Message], messages: list[Message]) -> None:
        """Turn fetched messages into deliveries of the partitions still owned, add
        them to the buffer and wake a waiting fetch. (Only this thread changes what
        is owned, so reading it needs no lock.)"""
        owned = self._owned
        errors: list[KafkaError] = []
        deliveries: list[Delivery] = []
        for r in ready:
            topic, part, offset = r.topic(), r.partition(), r.offset()
            assert topic is not None and part is not None and offset is not None
            retry_owner = owned.get((topic, part))
            if retry_owner is not None:
                deliveries.append(self._redelivery(r, topic, part, offset, retry_owner))
        append = deliveries.append
        last: tuple[str, int] | None = None
        owner: Ownership | None = None
        # Taken one by one from the end of the reversed list, so each message (and the
        # list and tuples of its headers) is freed as soon as it is converted: kept
        # alive to the end of the batch, they would trigger the cyclic garbage
        # collector many times per batch.
        pending = cast(list[_Fetched], messages)
        pending.reverse()
        take = pending.pop
        while pending:
            m = take()
            error = m.error()
            if error is not None:
                errors.append(error)
                continue
            topic, part = m.topic(), m.partition()
            if last is None or part != last[1] or topic != last[0]:
                last = (topic, part)
                owner = owned.get(last)
            if owner is None:
                continue  # revoked meanwhile; the next owner reads it
            raw_key, raw_headers = m.key(), m.headers()
            if raw_headers:
                try:
                    headers = {k: v.decode() for k, v in raw_headers}
                except (AttributeError, UnicodeDecodeError):  # a null or non-UTF-8 value
                    headers = _headers(raw_headers)
            else:
                headers = {}
            append(
                Delivery(
                    channel=topic,
                    partition=part,
                    offset=m.offset(),
                    key=None if raw_key is None else raw_key.decode("utf-8", "replace"),
                    headers=headers,
                    body=m.value() or b"",
                    attempt=1,
                    timestamp=max(m.timestamp()[1], 0) / 1000,
                    handle=owner,
                )
            )
        with self._lock:
            fetched = self._tracker.fetched
            for d in deliveries:
                handle = d.handle
                if type(handle) is RetryHandle:
                    fetched(handle.key[0], handle.key[1], handle.offset)
                else:
                    fetched(d.channel, d.partition, d.offset)
            self._buffer += deliveries
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._wake(waiter)
        for error in errors:
            self._consumer_error(error)

    def _wake(self, waiter: asyncio.Future[None]) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_resolve, waiter)

    def _fail(self, failure: TransportError) -> None:
        with self._lock:
            self._failure = failure
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._wake(waiter)

    def _fetch_error(self, exc: KafkaException) -> TransportError:
        text = f"fetching for group {self.group!r} from Kafka at {self._transport.url} failed"
        error = exc.args[0] if exc.args else None
        if isinstance(error, KafkaError) and (error.retriable() or error.code() in CONNECTIVITY):
            return TransportUnavailable(f"{text}: {error.str()}")
        return TransportError(f"{text}: {exc}")

    def _take_retries(self, limit: int) -> list[Message]:
        """Due redeliveries: held ones first, then what the retry consumer has. The
        first copy not due yet in a retry partition is held and the partition paused
        until it is (so a partition holds at most one message back)."""
        retries = self._retries
        assert retries is not None
        now = time.time()
        ready: list[Message] = []
        if self._held:
            resume: list[TopicPartition] = []
            for key, (due, m) in list(self._held.items()):
                if len(ready) < limit and due <= now:
                    del self._held[key]
                    ready.append(m)
                    resume.append(TopicPartition(key[0], key[1]))
            if resume:
                retries.resume(resume)
        while len(ready) < limit:
            polled = retries.poll(0)
            if polled is None:
                break
            m = polled
            error = m.error()
            if error is not None:
                self._consumer_error(error)
                continue
            due = _not_before(m)
            if due > now:
                topic, part = m.topic(), m.partition()
                assert topic is not None and part is not None
                self._held[(topic, part)] = (due, m)
                retries.pause([TopicPartition(topic, part)])
                continue
            ready.append(m)
        return ready

    def _redelivery(
        self, m: Message, topic: str, part: int, offset: int, owner: Ownership
    ) -> Delivery:
        headers = _headers(m.headers())
        pop = headers.pop
        pop(NOT_BEFORE, None)
        raw_key = m.key()
        return Delivery(
            channel=headers.pop(ORIGIN_CHANNEL, "") or self._origins[topic],
            partition=_number(pop(ORIGIN_PARTITION, None), part),
            offset=_number(pop(ORIGIN_OFFSET, None), offset),
            key=None if raw_key is None else raw_key.decode("utf-8", "replace"),
            headers=headers,
            body=m.value() or b"",
            attempt=_number(pop(ATTEMPT, None), 2),
            timestamp=_seconds(pop(ORIGIN_TIMESTAMP, None), max(m.timestamp()[1], 0) / 1000),
            handle=RetryHandle(owner, topic, part, offset),
        )

    def _consumer_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fail(
                TransportError(
                    f"the Kafka consumer of group {self.group!r} failed for good: {error}"
                )
            )
            self._stopping.wait(FAILURE_BACKOFF)  # a failed consumer says so at every poll
        elif error.code() in CONNECTIVITY:
            self._transport.reachability.lost(error.str())
        else:
            log.warning("Kafka consumer of group %r: %s", self.group, error)

    # -- rebalancing ------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        moved: list[TopicPartition] = []
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if key in self._started:
                continue
            self._started.add(key)
            try:
                offset = self._start_offset(consumer, tp.topic, tp.partition)
            except KafkaException as exc:
                self._fail(
                    TransportError(
                        f"cannot find where to start {tp.topic}[{tp.partition}] for "
                        f"{self._start!r}: {exc}; it resumes from its committed position",
                        channel=tp.topic,
                    )
                )
                continue
            if offset is not None:
                tp.offset = offset
                moved.append(TopicPartition(tp.topic, tp.partition, offset))
        consumer.incremental_assign(partitions)
        if moved:
            # Committed at once, so the replay holds even if the partition moves on.
            failed = self._commit_offsets(
                consumer, {(t.topic, t.partition): t.offset for t in moved}
            )
            if failed:
                log.warning("committing the replay positions %s failed", sorted(failed))
        retry_parts = [
            TopicPartition(self._retry_topics[tp.topic], tp.partition) for tp in partitions
        ]
        with self._lock:
            for tp in partitions:
                for key in ((tp.topic, tp.partition), (self._retry_topics[tp.topic], tp.partition)):
                    self._tracker.forget(*key)
                    self._positions.pop(key, None)
                    self._owned[key] = Ownership(*key)
            self._assignment = self._main_assignment()
        assert self._retries is not None
        self._retries.incremental_assign(retry_parts)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(consumer, partitions, commit=True)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own them already: committing could move its position.
        self._release(consumer, partitions, commit=False)

    def _release(self, consumer: Consumer, partitions: list[TopicPartition], commit: bool) -> None:
        main = [(tp.topic, tp.partition) for tp in partitions]
        retry = [(self._retry_topics[t], p) for t, p in main]
        with self._lock:
            positions = {k: self._positions.pop(k) for k in main + retry if k in self._positions}
            for key in main + retry:
                self._owned.pop(key, None)
                self._tracker.forget(*key)
            owned = self._owned
            self._buffer[:] = [d for d in self._buffer if owned.get(_key(d)) is _owner(d)]
            self._assignment = self._main_assignment()
        for key in main + retry:
            self._held.pop(key, None)
            self._committing.pop(key, None)
            self._paused.discard(key)
        assert self._retries is not None
        if commit and positions:
            self._commit_offsets(consumer, {k: v for k, v in positions.items() if k in main})
            self._commit_offsets(self._retries, {k: v for k, v in positions.items() if k in retry})
        self._retries.incremental_unassign([TopicPartition(t, p) for t, p in retry])
        consumer.incremental_unassign(partitions)

    def _main_assignment(self) -> frozenset[Key]:
        return frozenset(k for k in self._owned if k[0] not in self._origins)

    def _start_offset(self, consumer: Consumer, topic: str, partition: int) -> int | None:
        start, timeout = self._start, self._settings.request_timeout
        if start.kind == "committed":
            return None
        if start.kind == "offsets":
            return (start.offsets or {}).get(topic, {}).get(partition)
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout, cached=False
        )
        if start.kind == "beginning":
            return int(low)
        if start.kind == "end":
            return int(high)
        millis = int((start.time or 0.0) * 1000)
        [found] = consumer.offsets_for_times([TopicPartition(topic, partition, millis)], timeout)
        if found.error is not None:
            raise KafkaException(found.error)
        return int(found.offset) if found.offset >= 0 else int(high)

    # -- committing ---------------------------------------------------------------

    def _commit_pending(self, *, wait: bool) -> None:
        """Commit the settled positions: without waiting for the broker (the outcome
        comes to ``_on_commit``), or synchronously."""
        consumer, retries = self._consumer, self._retries
        if consumer is None or retries is None:
            return
        if self._transport.reachability.unreachable:
            # Kept until Kafka answers again: a commit now would only fail (and a
            # synchronous one would hold this thread until the session times out).
            return
        with self._lock:
            if not self._positions:
                return
            positions, self._positions = self._positions, {}
        self._last_commit = time.monotonic()
        main = {k: v for k, v in positions.items() if k[0] not in self._origins}
        retry = {k: v for k, v in positions.items() if k[0] in self._origins}
        if wait:
            failed = self._commit_offsets(consumer, main)
            failed.update(self._commit_offsets(retries, retry))
        else:
            failed = self._commit_soon(consumer, main)
            failed.update(self._commit_soon(retries, retry))
        if failed:
            self._keep(failed)

    def _commit_soon(self, consumer: Consumer, positions: Mapping[Key, int]) -> dict[Key, int]:
        """Send a commit without waiting for it; return the positions it could not send."""
        if not positions:
            return {}
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            log.debug("committing %s for group %r failed: %s", offsets, self.group, exc)
            return dict(positions)
        self._committing.update(positions)
        return {}

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The outcome of a commit: a position that failed and has not been passed
        by a later commit is committed again."""
        failed: dict[Key, int] = {}
        committing = self._committing
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if committing.get(key) != tp.offset:
                continue  # a synchronous commit, or one a later commit supersedes
            del committing[key]
            if error is not None or tp.error is not None:
                failed[key] = tp.offset
        if failed:
            log.debug("committing %s for group %r failed: %s", failed, self.group, error)
            self._keep(failed)

    def _keep(self, failed: Mapping[Key, int]) -> None:
        """Positions whose commit failed wait for the next one (unless revoked or passed)."""
        with self._lock:
            for key, position in failed.items():
                if key in self._owned and self._positions.get(key, -1) < position:
                    self._positions[key] = position

    def _commit_offsets(self, consumer: Consumer, positions: Mapping[Key, int]) -> dict[Key, int]:
        """Commit synchronously; return the positions that failed (to try again)."""
        if not positions:
            return {}
        offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.debug("committing %s for group %r failed: %s", offsets, self.group, exc)
            return dict(positions)
        failed = {
            (tp.topic, tp.partition): tp.offset for tp in result or [] if tp.error is not None
        }
        if failed:
            log.debug("committing %s for group %r failed in part", failed, self.group)
        return failed

    def _shutdown(self) -> None:
        consumer, retries = self._consumer, self._retries
        try:
            self._commit_pending(wait=True)
            if consumer is not None:
                consumer.close()  # revokes (committing what was settled) and leaves the group
            if retries is not None:
                with self._lock:
                    positions = dict(self._positions)
                    self._positions.clear()
                self._commit_offsets(retries, positions)
        finally:
            with self._lock:
                self._owned.clear()
                self._buffer.clear()
                self._assignment = frozenset()
            self._held.clear()
            if retries is not None:
                with contextlib.suppress(RuntimeError, KafkaException):
                    retries.close()


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _key(d: Delivery) -> Key:
    handle = d.handle
    if type(handle) is RetryHandle:
        return handle.key
    return (d.channel, d.partition)


def _owner(d: Delivery) -> object:
    handle = d.handle
    return handle.owner if type(handle) is RetryHandle else handle


def _foreign(d: Delivery) -> str:
    return (
        f"delivery {d.channel}[{d.partition}]@{d.offset} was not fetched from this Kafka "
        "subscription; settle a delivery on the subscription that fetched it"
    )


def _headers(
    raw: Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None,
) -> dict[str, str]:
    if not raw:
        return {}
    pairs = raw.items() if isinstance(raw, Mapping) else raw
    return {k: _header_text(v) for k, v in pairs}


def _header_text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _not_before(m: Message) -> float:
    """When a retry copy is due (Unix seconds; 0 when the header is missing)."""
    return _seconds(_headers(m.headers()).get(NOT_BEFORE), 0.0)


def _number(raw: str | None, default: int) -> int:
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


def _seconds(raw: str | None, default: float) -> float:
    try:
        return float(raw) if raw is not None else default
    except ValueError:
        return default
