"""The Kafka transport: topics are channels, consumer groups are groups.

When the brokers go away, nothing is reopened: librdkafka reconnects every client
by itself, with backoff, and the transport warns once per outage (naming the URL
and the error) and notes when the cluster answers again.

- ``publish`` blocks and retries: librdkafka keeps the batch queued and sends it
  once a broker answers. The bound is ``delivery_timeout`` (120 s unless the URL
  sets it): a batch not acknowledged by then fails with ``TransportUnavailable``
  naming the URL and the topic. Publishing it again is safe (at-least-once).
- A subscription's ``fetch`` keeps its time bound and returns nothing while the
  brokers are away. Settling still works; the settled positions are kept and
  committed once the cluster answers again (a commit on revoke already under way
  when the outage begins can hold the member's serving thread until its session
  times out).
- A member whose session timed out during the outage rejoins its group, which may
  move partitions: deliveries fetched before are then stale (settling them changes
  nothing) and come again from the last committed position. Nothing acknowledged
  and committed before the outage comes back; deliveries unsettled at the outage
  may come twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewPartitions, NewTopic

from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
from nervus.transports._contract import (
    Features,
    OutgoingMessage,
    Start,
    Subscription,
    Transport,
    ensure_open,
)
from nervus.transports.kafka._producer import Publisher
from nervus.transports.kafka._reachability import CONNECTIVITY, Reachability
from nervus.transports.kafka._settings import KafkaSettings, parse_url, redact
from nervus.transports.kafka._subscription import KafkaSubscription, retry_topic

log = logging.getLogger("nervus.transports.kafka")

PROBE_BACKOFF = (0.25, 5.0)
"""First and longest wait between probes of an unreachable cluster, in seconds."""

PROBE_TIMEOUT = 5.0
"""How long one probe waits for the cluster to answer, in seconds."""

# Errors creating a topic that a retry cannot fix: the name or the settings are wrong.
_REFUSED = {
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.INVALID_PARTITIONS,
    KafkaError.INVALID_REPLICATION_FACTOR,
    KafkaError.INVALID_CONFIG,
    KafkaError.POLICY_VIOLATION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
}


class KafkaTransport(Transport):
    """Channels are topics, groups are Kafka consumer groups (cooperative-sticky
    assignment), positions are committed offsets.

    - Publishing uses one idempotent producer (``acks=all``) per transport;
      ``publish`` queues the whole batch and returns when every message is
      acknowledged. The partition of a key is the Java client's (murmur2).
    - ``nack(delay)`` writes a copy (headers ``nervus_attempt``,
      ``nervus_not_before`` and the original position) to the partition of the
      same number in the group's retry topic ``<channel>.<group>.retry``; the
      member owning a channel partition also reads that retry partition and holds
      a copy back until it is due. Once the copy is written the original is
      settled, so a redelivery survives the member's death.
    - ``start=`` moves the positions of the partitions this member is assigned,
      the first time it is assigned each, and commits them at once; replay a group
      while it has no other members.
    - Topics are created with ``partitions`` and ``replication_factor`` on first
      use (publish, subscribe, ``ensure_channel``); existing topics keep theirs.
    """

    features = Features(
        cross_process_groups=True, replay=True, replay_from_time=True, delayed_redelivery=True
    )

    def __init__(self, settings: KafkaSettings, *, url: str | None = None) -> None:
        problems = settings.validate()
        if problems:
            raise ConfigurationError(problems)
        self.settings = settings
        self.url = url or f"kafka://{settings.bootstrap_servers}"
        self._publisher: Publisher | None = None
        self._admin: AdminClient | None = None
        self._channels: dict[str, int] = {}
        self._creating: dict[str, asyncio.Future[int]] = {}
        self._subscriptions: set[KafkaSubscription] = set()
        self._connected = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe: asyncio.Task[None] | None = None
        self.reachability = Reachability(self.url, log, on_outage=self._outage_began)

    @classmethod
    def from_url(cls, url: str, key: str = "NERVUS_TRANSPORT") -> KafkaTransport:
        """``kafka://[user:password@]host:port[,host:port...]?option=value`` (see
        ``KafkaSettings``), e.g. ``kafka://127.0.0.1:9092?partitions=8&compression=zstd``."""
        return cls(parse_url(url, key), url=redact(url))

    # -- lifecycle --------------------------------------------------------------

    async def connect(self) -> None:
        ensure_open(self._closed, f"Kafka transport on {self.url}")
        if self._connected:
            return
        timeout = self.settings.connect_timeout
        self._loop = asyncio.get_running_loop()
        config = self.reachability.client_config
        try:
            admin = AdminClient(config(self.settings.admin_config(log)))
            publisher = Publisher(
                config(self.settings.producer_config(log)), log, url=self.url, also_poll=admin
            )
        except KafkaException as exc:
            raise ConfigurationError([f"Kafka transport on {self.url}: {_text(exc)}"]) from exc
        try:
            async with asyncio.timeout(timeout + 1):
                await asyncio.wrap_future(admin.describe_cluster(request_timeout=timeout))
        except (KafkaException, TimeoutError) as exc:
            await asyncio.to_thread(publisher.close, 0)
            reason = _text(exc) if isinstance(exc, KafkaException) else "no answer"
            cause = self.reachability.last_error
            if cause is not None and cause not in reason:
                reason = f"{reason}; last connection error: {cause}"
            raise TransportUnavailable(
                f"cannot reach Kafka at {self.url} within {timeout}s: {reason}"
            ) from exc
        self._admin, self._publisher = admin, publisher
        self._connected = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        for sub in list(self._subscriptions):
            with contextlib.suppress(TransportError, KafkaException):
                await sub.close()
        publisher, self._publisher = self._publisher, None
        self._admin = None
        self._connected = False
        if publisher is not None:
            left = await asyncio.to_thread(publisher.close, min(self.settings.delivery_timeout, 30))
            if left:
                log.warning("closing the Kafka transport on %s dropped %d messages", self.url, left)

    # -- outages ----------------------------------------------------------------

    def _outage_began(self) -> None:
        """Called on a client's thread at the first connectivity error of an outage."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._start_probe)

    def _start_probe(self) -> None:
        if self._closed or self._admin is None:
            return
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_answered(self._admin))

    async def _probe_until_answered(self, admin: AdminClient) -> None:
        """Ask the cluster to describe itself, with backoff, until it answers."""
        delay = PROBE_BACKOFF[0]
        while self.reachability.unreachable and not self._closed:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT + 1):
                    await asyncio.wrap_future(admin.describe_cluster(request_timeout=PROBE_TIMEOUT))
            except (KafkaException, TimeoutError) as exc:
                log.debug("Kafka at %s still does not answer: %s", self.url, _text(exc))
                delay = min(delay * 2, PROBE_BACKOFF[1])
                continue
            self.reachability.answered()

    def _check(self) -> None:
        ensure_open(self._closed, f"Kafka transport on {self.url}")
        if not self._connected:
            raise TransportUnavailable(
                f"the Kafka transport on {self.url} is not connected; "
                "await transport.connect() or use 'async with transport'"
            )

    @property
    def publisher(self) -> Publisher:
        self._check()
        assert self._publisher is not None
        return self._publisher

    @property
    def admin(self) -> AdminClient:
        self._check()
        assert self._admin is not None
        return self._admin

    # -- topics -----------------------------------------------------------------

    async def ensure_channel(self, channel: str, partitions: int | None = None) -> int:
        self._check()
        if partitions is not None and partitions < 1:
            raise ConfigurationError(
                [f"channel {channel!r}: partitions={partitions} must be at least 1"]
            )
        return await self._topic(channel, partitions)

    async def _topic(self, topic: str, partitions: int | None = None) -> int:
        """The partition count of ``topic``, created first when missing."""
        known = self._channels.get(topic)
        if known is not None:
            return known
        if not topic:
            raise ConfigurationError(["a channel name must not be empty"])
        pending = self._creating.get(topic)
        if pending is None:
            pending = asyncio.ensure_future(
                self._create(topic, partitions or self.settings.partitions)
            )
            self._creating[topic] = pending
        try:
            count = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._creating.pop(topic, None)
        self._channels[topic] = count
        return count

    async def _create(self, topic: str, partitions: int) -> int:
        timeout = self.settings.request_timeout
        new = NewTopic(
            topic, num_partitions=partitions, replication_factor=self.settings.replication_factor
        )
        try:
            futures = self.admin.create_topics([new], request_timeout=timeout)
            await asyncio.wrap_future(futures[topic])
        except KafkaException as exc:
            error = _error(exc)
            if error is None or error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise _topic_error(topic, "create", exc, self.url) from exc
        return await self._describe(topic)

    async def _describe(self, topic: str) -> int:
        """The partition count of an existing topic (waiting out metadata propagation)."""
        deadline = time.monotonic() + self.settings.request_timeout
        while True:
            try:
                futures = self.admin.describe_topics(
                    TopicCollection([topic]), request_timeout=self.settings.request_timeout
                )
                description: Any = await asyncio.wrap_future(futures[topic])
                count = len(description.partitions)
                if count:
                    return count
            except KafkaException as exc:
                error = _error(exc)
                if error is None or error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise _topic_error(topic, "describe", exc, self.url) from exc
            if time.monotonic() > deadline:
                raise TransportUnavailable(
                    f"topic {topic!r} was created but Kafka did not show it within "
                    f"{self.settings.request_timeout}s",
                    channel=topic,
                )
            await asyncio.sleep(0.05)

    async def _ensure_partitions(self, topic: str, partitions: int) -> None:
        """``topic`` exists with at least ``partitions`` partitions."""
        count = await self._topic(topic, partitions)
        if count >= partitions:
            return
        try:
            futures = self.admin.create_partitions(
                [NewPartitions(topic, partitions)], request_timeout=self.settings.request_timeout
            )
            await asyncio.wrap_future(futures[topic])
        except KafkaException as exc:
            error = _error(exc)
            if error is None or error.code() != KafkaError.INVALID_PARTITIONS:
                raise _topic_error(topic, "add partitions to", exc, self.url) from exc
        self._channels.pop(topic, None)
        await self._topic(topic)

    # -- publishing -------------------------------------------------------------

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        self._check()
        if not messages:
            return
        if channel not in self._channels:
            await self._topic(channel)
        await self.publisher.send(channel, messages)

    # -- consuming --------------------------------------------------------------

    async def subscribe(
        self,
        channels: Iterable[str],
        group: str,
        *,
        max_in_flight: int = 1000,
        start: Start | None = None,
    ) -> Subscription:
        self._check()
        names = list(dict.fromkeys(channels))
        if not names:
            raise ConfigurationError([f"group {group!r}: subscribe to at least one channel"])
        if not group:
            raise ConfigurationError(["a consumer group name must not be empty"])
        if max_in_flight < 1:
            raise ConfigurationError([f"max_in_flight={max_in_flight} must be at least 1"])
        for name in names:
            count = await self._topic(name)
            await self._ensure_partitions(retry_topic(name, group), count)
        sub = KafkaSubscription(self, group, names, max_in_flight=max_in_flight, start=start)
        self._subscriptions.add(sub)
        try:
            await sub.start()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await sub.close()
            if isinstance(exc, KafkaException):
                raise ConfigurationError(
                    [f"Kafka consumer of group {group!r} on {self.url}: {_text(exc)}"]
                ) from exc
            raise
        return sub

    def forget_subscription(self, sub: KafkaSubscription) -> None:
        self._subscriptions.discard(sub)


def _error(exc: KafkaException) -> KafkaError | None:
    first = exc.args[0] if exc.args else None
    return first if isinstance(first, KafkaError) else None


def _text(exc: BaseException) -> str:
    error = _error(exc) if isinstance(exc, KafkaException) else None
    return error.str() if error is not None else str(exc)


def _topic_error(topic: str, action: str, exc: KafkaException, url: str) -> Exception:
    error = _error(exc)
    text = f"cannot {action} Kafka topic {topic!r} on {url}: {_text(exc)}"
    if error is not None and error.code() in _REFUSED:
        return ConfigurationError([f"channel {topic!r}: {text}"])
    if error is not None and (error.retriable() or error.code() in CONNECTIVITY):
        return TransportUnavailable(text, channel=topic)
    return TransportError(text, channel=topic)
