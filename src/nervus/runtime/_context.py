"""What a handler receives besides the event: the envelope, where it came from, a
logger, and ``publish`` for the events it causes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nervus.core import Envelope, Message
from nervus.errors import ConfigurationError
from nervus.runtime._outgoing import encode
from nervus.transports import Delivery, OutgoingMessage

if TYPE_CHECKING:
    from nervus.runtime._outbox import ServiceTransaction

CURRENT: ContextVar[Context | None] = ContextVar("nervus_handling", default=None)
"""The context of the message being handled by the running task (set by the runtime)."""


def current_context() -> Context | None:
    """The context of the message being handled by the running task, if any."""
    return CURRENT.get()


@dataclass(frozen=True, slots=True)
class DeliveryInfo:
    """Where the handled message came from and how often it was delivered."""

    group: str
    channel: str
    partition: int
    offset: int
    attempt: int
    key: str | None


class HandlerLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds the service, event type, event id and correlation id to each
    record (as ``record.nervus_service`` ... ), keeping any ``extra`` the caller passes."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        base: Mapping[str, object] = self.extra or {}
        kwargs["extra"] = {**base, **extra} if extra else base
        return msg, kwargs


class Context:
    """The handling of one delivery. Valid only while the handler runs.

    ``publish`` stages messages; they are published (one call per channel) after
    the handler returns and before the delivery is acknowledged, so an attempt
    that fails publishes nothing. Staged messages join the handled event's
    conversation: same correlation id, causation id = the handled event's id.
    """

    __slots__ = (
        "_delivery",
        "_group",
        "_logger",
        "_service",
        "_staged",
        "_transactions",
        "envelope",
        "inbox",
        "recorded",
    )

    def __init__(
        self,
        envelope: Envelope,
        delivery: Delivery,
        *,
        group: str,
        service: str,
        logger: logging.Logger,
        transactions: Callable[[Context], AbstractAsyncContextManager[ServiceTransaction]]
        | None = None,
        inbox: bool = False,
    ) -> None:
        self.envelope = envelope
        self._transactions = transactions
        self.inbox = inbox  # record the message in the group's inbox
        self.recorded = False  # a transaction of this handling recorded it
        self._delivery = delivery
        self._group = group
        self._service = service
        self._logger: logging.Logger | HandlerLogger = logger
        self._staged: list[tuple[str, OutgoingMessage]] = []

    @property
    def service(self) -> str:
        """The name of the service handling the message."""
        return self._service

    @property
    def delivery(self) -> DeliveryInfo:
        d = self._delivery
        return DeliveryInfo(self._group, d.channel, d.partition, d.offset, d.attempt, d.key)

    @property
    def logger(self) -> HandlerLogger:
        """A logger whose records carry ``nervus_service``, ``nervus_type``,
        ``nervus_id`` and ``nervus_correlation_id``."""
        logger = self._logger
        if isinstance(logger, HandlerLogger):
            return logger
        env = self.envelope
        adapter = HandlerLogger(
            logger,
            {
                "nervus_service": self._service,
                "nervus_type": env.type,
                "nervus_id": env.id,
                "nervus_correlation_id": env.correlationid or env.id,
            },
        )
        self._logger = adapter
        return adapter

    async def publish(
        self, event: Message, *, key: str | None = None, subject: str | None = None
    ) -> None:
        """Stage ``event`` for publishing once the handler has succeeded."""
        self._staged.append(
            encode(
                event, source=self._service_source, key=key, subject=subject, cause=self.envelope
            )
        )

    def transaction(self) -> AbstractAsyncContextManager[ServiceTransaction]:
        """One store transaction for the handler's own SQL, the events it publishes
        (through the outbox: sent if, and once, it commits) and, with ``inbox=True``,
        the record that its group handled this message."""
        if self._transactions is None:
            raise ConfigurationError(
                [f"service {self._service!r}: transactions need the service's store"]
            )
        return self._transactions(self)

    @property
    def group(self) -> str:
        """The consumer group handling the message."""
        return self._group

    @property
    def _service_source(self) -> str:
        return "/nervus/" + self._service

    def staged(self) -> list[tuple[str, OutgoingMessage]]:
        """The messages staged so far, as ``(channel, message)``."""
        return self._staged
