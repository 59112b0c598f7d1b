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
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from nervus.errors import TransportError, TransportUnavailable
from nervus.transports._contract import OutgoingMessage
from nervus.transports.kafka._reachability import CONNECTIVITY

POLL_INTERVAL = 0.05
"""How long the polling thread waits for delivery reports in one call."""


class _Batch:
    """The delivery reports of one ``publish`` call, counted on the polling thread."""

    __slots__ = ("_lock", "_loop", "_pending", "_sealed", "error", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending = 0
        self._sealed = False
        self.error: KafkaError | None = None
        self.future: asyncio.Future[None] = loop.create_future()

    def add(self) -> None:
        with self._lock:
            self._pending += 1

    def withdraw(self) -> None:
        """A message counted by ``add`` was not queued after all."""
        with self._lock:
            self._pending -= 1

    def report(self, error: KafkaError | None, _message: Message) -> None:
        """Delivery report of one message (on the polling thread)."""
        with self._lock:
            self._pending -= 1
            if error is not None and self.error is None:
                self.error = error
            done = self._sealed and self._pending == 0
        if done:
            self._loop.call_soon_threadsafe(self._resolve)

    def seal(self) -> None:
        """Every message is queued; resolve once their reports are in (on the loop)."""
        with self._lock:
            self._sealed = True
            done = self._pending == 0
        if done:
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
        batch = _Batch(asyncio.get_running_loop())
        produce, report = self._producer.produce, batch.report
        part = -1 if partition is None else partition
        try:
            for m in messages:
                key = None if m.key is None else m.key.encode()
                batch.add()
                while True:
                    try:
                        produce(
                            topic,
                            m.body,
                            key,
                            partition=part,
                            on_delivery=report,
                            headers=_header_list(m.headers),
                        )
                        break
                    except BufferError:
                        # librdkafka's queue is full: let the polling thread drain it.
                        await asyncio.sleep(POLL_INTERVAL / 5)
        except KafkaException as exc:
            batch.withdraw()
            batch.seal()
            await batch.future
            raise _publish_error(self._url, topic, exc.args[0] if exc.args else exc) from exc
        except BaseException:
            batch.withdraw()
            batch.seal()
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


def _header_list(headers: Mapping[str, str]) -> list[tuple[str, str | bytes | None]]:
    return [(k, v.encode()) for k, v in headers.items()]


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
