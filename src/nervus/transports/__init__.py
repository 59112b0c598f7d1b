"""Transports: one package per broker behind the contract in ``_contract``."""

from nervus.transports._contract import (
    DeadLetterReason,
    Delivery,
    Features,
    OffsetTracker,
    OutgoingMessage,
    Start,
    Subscription,
    Transport,
    dead_letter_channel,
    dead_letter_message,
    partition_for,
)
from nervus.transports._urls import (
    from_url,
    parse_options,
    redact,
    register_scheme,
    transport_schemes,
)

__all__ = [
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
]
