"""A member of a Kafka consumer group, with durable delayed redelivery through a
per-group retry topic.

Threads: a librdkafka consumer must not be called from two threads at once, so
every call on this member's consumers (and the rebalance callbacks they run)
happens on one dedicated thread. The event loop only queues work for it; ``ack``
never waits for it (the settled positions are shared under a lock and committed
by that thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka._types import HeadersType

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
"""Longest single wait of the consumer thread: due retries, commits and close are
looked at least this often while a fetch waits."""

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

    __slots__ = ("partition", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition


class RetryHandle:
    """The ``handle`` of a redelivery: where its copy sits in the retry topic."""

    __slots__ = ("offset", "owner", "partition", "topic")

    def __init__(self, owner: Ownership, topic: str, partition: int, offset: int) -> None:
        self.owner = owner
        self.topic = topic
        self.partition = partition
        self.offset = offset


class KafkaSubscription(Subscription):
    """Fetches from the partitions the group assigns this member, and from the same
    partitions of the group's retry topics; commits settled positions in batches
    (at most every ``commit_interval`` seconds, on revoke and on close)."""

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
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nervus-kafka-consumer")
        # shared between the loop and the consumer thread, under _lock
        self._lock = threading.Lock()
        self._owned: dict[Key, Ownership] = {}
        self._tracker = OffsetTracker()
        self._positions: dict[Key, int] = {}
        self._assignment: frozenset[Key] = frozenset()
        self._failure: TransportError | None = None
        self._stopping = threading.Event()
        # the consumer thread's own
        self._consumer: Consumer | None = None
        self._retries: Consumer | None = None
        self._held: dict[Key, tuple[float, Message]] = {}
        self._started: set[Key] = set()
        self._last_commit = 0.0
        # the event loop's own
        self._closed = False
        self._ready: deque[Delivery] = deque()
        self._job: asyncio.Future[list[Delivery]] | None = None
        self._commit_timer: asyncio.TimerHandle | None = None
        self._commit_job: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Create the consumers and join the group (the assignment follows on fetch)."""
        await self._run(self._open)

    def _run_later(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._run_later(fn, *args)

    # -- fetching ---------------------------------------------------------------

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        self._check()
        if max_messages <= 0:
            return []
        if not self._ready:
            job = self._job
            if job is None:
                # A fetch cancelled while its poll ran leaves the poll to finish; its
                # deliveries are kept for the next fetch, never dropped.
                job = self._job = self._run_later(self._poll, max_messages, max(timeout, 0.0))
            try:
                batch = await asyncio.shield(job)
            except KafkaException as exc:
                text = (
                    f"fetching for group {self.group!r} from Kafka at {self._transport.url} failed"
                )
                error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaError) and (
                    error.retriable() or error.code() in CONNECTIVITY
                ):
                    raise TransportUnavailable(f"{text}: {error.str()}") from exc
                raise TransportError(f"{text}: {exc}") from exc
            finally:
                if job.done():
                    self._job = None
            self._ready.extend(batch)
            self._check()
        if not self._ready:
            return []
        out: list[Delivery] = []
        ready = self._ready
        with self._lock:
            owned = self._owned
            while ready and len(out) < max_messages:
                d = ready.popleft()
                if owned.get(_key(d)) is _owner(d):
                    out.append(d)
        return out

    def _check(self) -> None:
        ensure_open(self._closed, f"Kafka subscription of group {self.group!r}")
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    # -- settling ---------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        ensure_open(self._closed, f"Kafka subscription of group {self.group!r}")
        with self._lock:
            for d in deliveries:
                self._settle(d)
        self._schedule_commit()

    def _settle(self, d: Delivery) -> None:
        """Mark ``d`` settled (the caller holds ``_lock``); stale deliveries change nothing."""
        handle = d.handle
        if type(handle) is Ownership:
            key, offset = (d.channel, d.partition), d.offset
        elif type(handle) is RetryHandle:
            key, offset, handle = (handle.topic, handle.partition), handle.offset, handle.owner
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
        self._schedule_commit()

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
        self._schedule_commit()

    def assignment(self) -> frozenset[tuple[str, int]]:
        return self._assignment

    # -- committing (scheduled on the loop, run on the consumer thread) --------

    def _schedule_commit(self) -> None:
        if self._commit_timer is not None or self._closed or not self._positions:
            return
        self._commit_timer = asyncio.get_running_loop().call_later(
            self._settings.commit_interval, self._commit_soon
        )

    def _commit_soon(self) -> None:
        self._commit_timer = None
        if self._closed or self._commit_job is not None:
            return
        job = self._commit_job = self._run_later(self._commit_pending)
        job.add_done_callback(self._commit_done)

    def _commit_done(self, job: asyncio.Future[None]) -> None:
        self._commit_job = None
        error = None if job.cancelled() else job.exception()
        if error is not None:
            log.warning("committing positions of group %r failed", self.group, exc_info=error)
        if self._positions:
            self._schedule_commit()

    # -- closing ----------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        self._transport.forget_subscription(self)
        try:
            await self._run(self._shutdown)
        finally:
            self._executor.shutdown(wait=False)

    # == on the consumer thread =================================================

    def _open(self) -> None:
        settings, group = self._settings, self.group
        config = self._transport.reachability.client_config
        self._consumer = Consumer(config(settings.consumer_config(log, group, self._max_in_flight)))
        self._retries = Consumer(
            config(settings.retry_consumer_config(log, retry_group(group), self._max_in_flight))
        )
        self._consumer.subscribe(
            list(self.channels),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _poll(self, limit: int, timeout: float) -> list[Delivery]:
        consumer = self._consumer
        assert consumer is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._positions and (
                time.monotonic() - self._last_commit >= self._settings.commit_interval
            ):
                self._commit_pending()
            out = self._take_retries(limit)
            room = limit - len(out)
            if room > 0:
                first = consumer.poll(0.0 if out else self._wait(deadline))
                if first is not None:
                    messages = [first]
                    if room > 1:
                        messages += consumer.consume(room - 1, 0)
                    out += self._deliveries(messages)
            if out or self._stopping.is_set() or time.monotonic() >= deadline:
                return out

    def _wait(self, deadline: float) -> float:
        wait = min(deadline - time.monotonic(), SLICE)
        if self._held:
            wait = min(wait, min(due for due, _ in self._held.values()) - time.time())
        return max(wait, 0.0)

    def _deliveries(self, messages: list[Message]) -> list[Delivery]:
        out: list[Delivery] = []
        with self._lock:
            owned, fetched = self._owned, self._tracker.fetched
            for m in messages:
                error = m.error()
                if error is not None:
                    self._consumer_error(error)
                    continue
                topic, part, offset = m.topic(), m.partition(), m.offset()
                assert topic is not None and part is not None and offset is not None
                owner = owned.get((topic, part))
                if owner is None:
                    continue  # revoked meanwhile; the next owner reads it
                fetched(topic, part, offset)
                raw_key = m.key()
                out.append(
                    Delivery(
                        channel=topic,
                        partition=part,
                        offset=offset,
                        key=None if raw_key is None else raw_key.decode("utf-8", "replace"),
                        headers=_headers(m.headers()),
                        body=m.value() or b"",
                        attempt=1,
                        timestamp=max(m.timestamp()[1], 0) / 1000,
                        handle=owner,
                    )
                )
        return out

    def _take_retries(self, limit: int) -> list[Delivery]:
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
        if not ready:
            return []
        out: list[Delivery] = []
        with self._lock:
            owned, fetched = self._owned, self._tracker.fetched
            for m in ready:
                topic, part, offset = m.topic(), m.partition(), m.offset()
                assert topic is not None and part is not None and offset is not None
                owner = owned.get((topic, part))
                if owner is None:
                    continue
                fetched(topic, part, offset)
                out.append(self._redelivery(m, topic, part, offset, owner))
        return out

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
            self._failure = TransportError(
                f"the Kafka consumer of group {self.group!r} failed for good: {error}"
            )
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
                self._failure = TransportError(
                    f"cannot find where to start {tp.topic}[{tp.partition}] for "
                    f"{self._start!r}: {exc}; it resumes from its committed position",
                    channel=tp.topic,
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
            self._assignment = self._main_assignment()
        for key in retry:
            self._held.pop(key, None)
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

    def _commit_pending(self) -> None:
        consumer, retries = self._consumer, self._retries
        if consumer is None or retries is None:
            return
        if self._transport.reachability.unreachable:
            # Kept until Kafka answers again: a synchronous commit now would hold this
            # thread, and so every fetch, until the group's session times out.
            return
        with self._lock:
            if not self._positions:
                return
            positions, self._positions = self._positions, {}
        self._last_commit = time.monotonic()
        main = {k: v for k, v in positions.items() if k[0] not in self._origins}
        retry = {k: v for k, v in positions.items() if k[0] in self._origins}
        failed = self._commit_offsets(consumer, main)
        failed.update(self._commit_offsets(retries, retry))
        if failed:
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
            self._commit_pending()
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
                self._assignment = frozenset()
            self._held.clear()
            if retries is not None:
                with contextlib.suppress(RuntimeError, KafkaException):
                    retries.close()


def _key(d: Delivery) -> Key:
    handle = d.handle
    if type(handle) is RetryHandle:
        return (handle.topic, handle.partition)
    return (d.channel, d.partition)


def _owner(d: Delivery) -> object:
    handle = d.handle
    return handle.owner if type(handle) is RetryHandle else handle


def _foreign(d: Delivery) -> str:
    return (
        f"delivery {d.channel}[{d.partition}]@{d.offset} was not fetched from this Kafka "
        "subscription; settle a delivery on the subscription that fetched it"
    )


def _headers(raw: HeadersType | None) -> dict[str, str]:
    if not raw:
        return {}
    pairs = raw.items() if isinstance(raw, dict) else raw
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
