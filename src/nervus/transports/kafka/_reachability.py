"""Whether the brokers of a transport answer: one warning when they stop, one note
when they answer again, instead of one line per failed connection attempt.

librdkafka reconnects on its own (with backoff) and reports every failed attempt of
every client (producer, admin, consumers) through ``error_cb`` and its log. Those
reports arrive here, on the clients' threads; the first connectivity error of an
outage is logged as a warning naming the URL and the error, the rest at debug
level. The transport probes the cluster while it is away and calls ``answered``
once it responds, which ends the outage (the next one is warned about again).
Errors a client queued during the outage and reports just after it (within
``SETTLE`` seconds) are taken as part of it; a new outage that begins so soon is
warned about at the clients' next failed attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

CONNECTIVITY = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._RESOLVE,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
    }
)
"""librdkafka error codes that mean "a broker does not answer" (a retry can help)."""

SETTLE = 5.0
"""Seconds after the cluster answered again during which connectivity errors are
taken as late reports of the outage that just ended."""

CONNECTION_FAILED = "FAIL"
"""librdkafka's log facility of a failed or closed broker connection (each also
reported to ``error_cb`` when it matters)."""


class Reachability:
    """Tracks outages of the brokers behind ``url`` (thread-safe)."""

    def __init__(
        self, url: str, log: logging.Logger, *, on_outage: Callable[[], None] | None = None
    ) -> None:
        self.url = url
        self._log = log
        self._on_outage = on_outage
        self._lock = threading.Lock()
        self._since: float | None = None
        self._answered = float("-inf")
        self.last_error: str | None = None

    @property
    def unreachable(self) -> bool:
        """True from the first connectivity error until the cluster answers again."""
        return self._since is not None

    def client_error(self, error: KafkaError) -> None:
        """``error_cb`` of every client of the transport (called on a client's thread)."""
        if error.code() in CONNECTIVITY:
            self.lost(error.str())
        elif error.fatal():
            self._log.error("Kafka client on %s failed for good: %s", self.url, error.str())
        else:
            self._log.warning("Kafka client error on %s: %s", self.url, error.str())

    def lost(self, reason: str) -> None:
        """A broker did not answer: warn once per outage."""
        self.last_error = reason
        with self._lock:
            if self._since is not None or time.monotonic() - self._answered < SETTLE:
                self._log.debug("Kafka at %s is still unreachable: %s", self.url, reason)
                return
            self._since = time.monotonic()
        self._log.warning(
            "Kafka at %s is unreachable (%s); publishers and consumers keep retrying "
            "with backoff until it answers",
            self.url,
            reason,
        )
        if self._on_outage is not None:
            self._on_outage()

    def answered(self) -> None:
        """The cluster answered: end the outage, if one is going on."""
        with self._lock:
            since, self._since = self._since, None
            if since is not None:
                self._answered = time.monotonic()
        if since is not None:
            self._log.info(
                "Kafka at %s answers again after %.1f s", self.url, time.monotonic() - since
            )

    def client_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with its errors and log lines reported through this tracker."""
        config["error_cb"] = self.client_error
        config["logger"] = _ClientLog(self._log)
        return config


class _ClientLog:
    """librdkafka's ``logger``: its lines go to the transport's logger, except the
    per-attempt connection failures, which go to debug (``error_cb`` reports them)."""

    __slots__ = ("_log",)

    def __init__(self, log: logging.Logger) -> None:
        self._log = log

    def log(self, level: int, msg: str, *args: Any) -> None:
        if args and args[0] == CONNECTION_FAILED:
            level = logging.DEBUG
        self._log.log(level, msg, *args)
