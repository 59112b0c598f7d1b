"""The service runtime: handlers, keyed concurrency, retries, settlement, shutdown.

Knows the transport contract, never which broker is behind it.
"""

from nervus.runtime._config import Settings
from nervus.runtime._context import Context, DeliveryInfo, HandlerLogger, current_context
from nervus.runtime._dispatch import KeyedDispatcher
from nervus.runtime._handlers import Handler, Registration
from nervus.runtime._outbox import AlreadyHandled, OutboxRelay, ServiceTransaction
from nervus.runtime._relay import Relay
from nervus.runtime._retry import RetryPolicy
from nervus.runtime._service import GroupHealth, Health, Service

__all__ = [
    "AlreadyHandled",
    "Context",
    "DeliveryInfo",
    "GroupHealth",
    "Handler",
    "HandlerLogger",
    "Health",
    "KeyedDispatcher",
    "OutboxRelay",
    "Registration",
    "Relay",
    "RetryPolicy",
    "Service",
    "ServiceTransaction",
    "Settings",
    "current_context",
]
