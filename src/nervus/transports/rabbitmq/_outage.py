"""How one connection to the broker goes through an outage: a warning when it is
lost, reconnection attempts spaced by capped exponential backoff, a note when it is back."""

from __future__ import annotations

import logging
import time

from aio_pika.abc import AbstractConnection

log = logging.getLogger("nervus.transports.rabbitmq")

FIRST_RETRY = 0.2
"""Seconds before the second reconnection attempt; each failure doubles it."""

MAX_RETRY = 5.0
"""The longest wait between two reconnection attempts, in seconds."""


def alive(connection: AbstractConnection | None) -> bool:
    """Whether ``connection`` is open: the client sets ``is_closed`` only when closed
    by its owner, and clears ``connected`` when the broker or the network closed it."""
    return connection is not None and not connection.is_closed and connection.connected.is_set()


def describe(error: BaseException | None) -> str:
    """``Type: message`` of an error, or why a connection closed without one."""
    if error is None:
        return "the connection was closed"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Outage:
    """The state of one connection's outage (``what`` and ``where`` name it in logs).

    ``lost`` starts an outage and logs one warning naming the broker and the error
    (later calls during the same outage only keep the latest error); ``failed``
    records a failed reconnection attempt and moves the next one further away;
    ``restored`` ends the outage with one log line.
    """

    __slots__ = ("_delay", "_error", "_next", "_since", "what", "where")

    def __init__(self, what: str, where: str) -> None:
        self.what = what
        self.where = where
        self._since: float | None = None
        self._error = ""
        self._delay = FIRST_RETRY
        self._next = 0.0

    @property
    def down(self) -> bool:
        return self._since is not None

    @property
    def error(self) -> str:
        """The latest error of the outage."""
        return self._error

    def lost(self, error: BaseException | None) -> None:
        self._error = describe(error)
        if self._since is not None:
            return
        self._since = time.monotonic()
        self._delay = FIRST_RETRY
        self._next = 0.0
        log.warning(
            "%s lost its connection to RabbitMQ at %s (%s); reconnecting with backoff "
            "up to %.0f s between attempts",
            self.what,
            self.where,
            self._error,
            MAX_RETRY,
        )

    def failed(self, error: BaseException) -> None:
        if self._since is None:
            self.lost(error)
        self._error = describe(error)
        self._next = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, MAX_RETRY)

    def wait(self) -> float:
        """Seconds until the next reconnection attempt is due (0: now)."""
        return max(self._next - time.monotonic(), 0.0)

    def restored(self) -> None:
        if self._since is None:
            return
        log.info(
            "%s reconnected to RabbitMQ at %s after %.1f s",
            self.what,
            self.where,
            time.monotonic() - self._since,
        )
        self._since = None
        self._error = ""
