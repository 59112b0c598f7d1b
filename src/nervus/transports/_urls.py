"""Reading transport URLs into typed settings: ``scheme://location?option=value``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nervus.core._urls import SchemeRegistry, parse_options, redact

if TYPE_CHECKING:
    from nervus.transports._contract import Transport

__all__ = ["from_url", "parse_options", "redact", "register_scheme", "transport_schemes"]

# Broker packages are imported only when their scheme is used.
_SCHEMES: SchemeRegistry[Transport] = SchemeRegistry(
    "transport",
    {
        "memory": "nervus.transports.memory:MemoryTransport.from_url",
        "sqlite": "nervus.transports.sqlite:SqliteTransport.from_url",
        "kafka": "nervus.transports.kafka:KafkaTransport.from_url",
        "nats": "nervus.transports.nats:NatsTransport.from_url",
        "redis": "nervus.transports.redis:RedisTransport.from_url",
        "postgresql": "nervus.transports.postgres:PostgresTransport.from_url",
        "amqp": "nervus.transports.rabbitmq:RabbitTransport.from_url",
    },
)


def register_scheme(scheme: str, factory: str) -> None:
    """Make ``scheme://`` URLs open a transport built by ``"module:Class.from_url"``."""
    _SCHEMES.register(scheme, factory)


def transport_schemes() -> list[str]:
    return _SCHEMES.schemes()


def from_url(url: str, *, key: str = "NERVUS_TRANSPORT") -> Transport:
    """Build (not connect) the transport a URL names; ``key`` names the setting in errors."""
    return _SCHEMES.build(url, key)
