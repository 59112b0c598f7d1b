"""The public names of each package are pinned: adding or removing one is a decision."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.unit

PUBLIC = {
    "nervus": ["Command", "Context", "Envelope", "Event", "Service", "Settings", "new_id", "uuid7"],
    "nervus.core": [
        "REGISTRY",
        "SYSTEM_CLOCK",
        "Clock",
        "Command",
        "Envelope",
        "Event",
        "ManualClock",
        "Message",
        "SystemClock",
        "TypeRegistry",
        "channel_of",
        "channel_of_type",
        "new_id",
        "type_name",
        "uuid7",
        "uuid7_time_ms",
    ],
    "nervus.codecs": ["JSON_CODEC", "UPCASTERS", "JsonCodec", "Upcast", "Upcasters", "upcaster"],
    "nervus.domain": [
        "Aggregate",
        "CommandResult",
        "Decision",
        "EventDecoder",
        "Loaded",
        "Projection",
        "ProjectionRunner",
        "ProjectionStatus",
        "ReadModelTransaction",
        "Repository",
        "evolve",
        "handles",
        "projection_statuses",
    ],
    "nervus.transports": [
        "DeadLetterReason",
        "Delivery",
        "Features",
        "OffsetTracker",
        "OutgoingMessage",
        "Start",
        "Subscription",
        "Transport",
        "dead_letter_channel",
        "dead_letter_message",
        "from_url",
        "parse_options",
        "partition_for",
        "redact",
        "register_scheme",
        "transport_schemes",
    ],
    "nervus.transports.memory": ["MemoryOptions", "MemorySubscription", "MemoryTransport"],
    "nervus.transports.sqlite": ["SqliteSettings", "SqliteSubscription", "SqliteTransport"],
    "nervus.transports.kafka": [
        "KafkaSettings",
        "KafkaSubscription",
        "KafkaTransport",
        "retry_group",
        "retry_topic",
    ],
    "nervus.transports.nats": ["NatsSettings", "NatsSubscription", "NatsTransport"],
    "nervus.transports.redis": ["RedisSettings", "RedisSubscription", "RedisTransport"],
    "nervus.transports.rabbitmq": ["RabbitSettings", "RabbitSubscription", "RabbitTransport"],
    "nervus.transports.postgres": ["PostgresSettings", "PostgresSubscription", "PostgresTransport"],
    "nervus.runtime": [
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
    ],
    "nervus.testing": ["EventStoreConformance", "Scenario", "TransportConformance"],
    "nervus.storage": [
        "ANY",
        "NO_STREAM",
        "AppendResult",
        "EventStore",
        "OutboxMessage",
        "RecordedEvent",
        "Snapshot",
        "StoreTransaction",
        "store_from_url",
        "store_schemes",
    ],
    "nervus.storage.sqlite": ["SqliteEventStore", "SqliteStoreSettings"],
    "nervus.storage.postgres": ["PostgresEventStore", "PostgresStoreSettings"],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_exported_members(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__all__ == PUBLIC[module_name]  # ruff (RUF022) keeps __all__ sorted
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{module_name} exports names it does not define: {missing}"
