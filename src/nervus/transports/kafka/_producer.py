"""Publishing: a librdkafka producer whose delivery reports resolve asyncio futures.

``produce`` only queues a message inside librdkafka (it never blocks); a thread
polls the producer for delivery reports and resolves each batch's future on the
event loop once every message of the batch is acknowledged (``acks=all``).

While no broker answers, librdkafka keeps the queued messages and sends them once
one does; a message not acknowledged within ``message.timeout.ms`` (the transport's
``delivery_timeout``) fails its batch with ``TransportUnavailable``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from nervus.errors import TransportError, TransportUnavailable
from nervus.transports._contract import OutgoingMessage
from nervus.transports.kafka._reachability import CONNECTIVITY

POLL_INTERVAL = 0.05
"""How long the polling thread waits for delivery reports in one call."""


class _Batch:
    """The delivery reports of one ``publish`` call, counted on the polling thread.

    Every report and the sender's ``seal`` each take one number from a counter
    (``next`` on an ``itertools.count`` is atomic): the one that takes the last
    resolves the batch, so reports need no lock.
    """

    __slots__ = ("_last", "_loop", "_taken", "error", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, pending: int) -> None:
        self._loop = loop
        self._taken = itertools.count(1)
        # One more than the messages: the sender's own number, taken by ``seal``
        # once every message is queued, so reports cannot finish the batch early.
        self._last = pending + 1
        self.error: KafkaError | None = None
        self.future: asyncio.Future[None] = loop.create_future()

    def report(self, error: KafkaError | None, _message: Message) -> None:
        """Delivery report of one message (on the polling thread)."""
        if error is not None and self.error is None:
            self.error = error
        if next(self._taken) == self._last:
            self._loop.call_soon_threadsafe(self._resolve)

    def seal(self, unqueued: int = 0) -> None:
        """Every message is queued but ``unqueued`` ones (on the loop); resolve once
        the reports of the queued ones are in."""
        last, taken = self._last, self._taken
        if any(next(taken) == last for _ in range(unqueued + 1)):
            self._resolve()

    def _resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class Publisher:
    """One idempotent producer shared by every publish of a transport."""

    def __init__(
        self, config: dict[str, Any], log: logging.Logger, *, url: str, also_poll: Any = None
    ) -> None:
        self._producer = Producer(config)
        self._url = url
        self._also_poll = also_poll  # a client whose logs and errors this thread serves
        self._log = log
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._poll_loop, name="nervus-kafka-producer", daemon=True
        )
        self._thread.start()

    def _poll_loop(self) -> None:
        producer, other, stop = self._producer, self._also_poll, self._stop
        while not stop.is_set():
            try:
                producer.poll(POLL_INTERVAL)
                if other is not None:
                    other.poll(0)
            except Exception:  # a report callback failing must not stop the reports
                self._log.exception("serving Kafka delivery reports failed")

    async def send(
        self,
        topic: str,
        messages: Sequence[OutgoingMessage],
        *,
        partition: int | None = None,
    ) -> None:
        """Queue every message, then wait for all their delivery reports."""
        batch = _Batch(asyncio.get_running_loop(), len(messages))
        produce: Callable[..., None] = self._producer.produce
        report = batch.report
        part = -1 if partition is None else partition
        queued = 0
        try:
            for m in messages:
                # confluent-kafka encodes str keys and header values as UTF-8 itself.
                try:
                    produce(topic, m.body, m.key, part, report, headers=m.headers)
                except BufferError:
                    # librdkafka's queue is full: let the polling thread drain it.
                    while True:
                        await asyncio.sleep(POLL_INTERVAL / 5)
                        try:
                            produce(topic, m.body, m.key, part, report, headers=m.headers)
                            break
                        except BufferError:
                            continue
                queued += 1
        except KafkaException as exc:
            batch.seal(len(messages) - queued)
            await batch.future
            raise _publish_error(self._url, topic, exc.args[0] if exc.args else exc) from exc
        except BaseException:
            batch.seal(len(messages) - queued)
            raise
        batch.seal()
        await batch.future
        if batch.error is not None:
            raise _publish_error(self._url, topic, batch.error)

    def close(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for queued messages; stop polling. Returns how many
        messages were still undelivered."""
        left = self._producer.flush(timeout)
        self._stop.set()
        self._thread.join()
        return left


def _publish_error(url: str, topic: str, error: object) -> TransportError:
    if not isinstance(error, KafkaError):
        return TransportError(
            f"Kafka at {url} did not accept messages published to topic {topic!r}: {error}",
            channel=topic,
        )
    text = f"Kafka at {url} did not accept messages published to topic {topic!r}: {error.str()}"
    if error.code() in CONNECTIVITY:
        return TransportUnavailable(
            f"{text}; no broker acknowledged them within the delivery_timeout, "
            "publish them again once Kafka answers",
            channel=topic,
        )
    if error.retriable():
        return TransportUnavailable(text, channel=topic)
    return TransportError(text, channel=topic)
