"""The benchmark's event: a typed ``Event`` of about 200 bytes of JSON."""

from __future__ import annotations

import time

from nervus import Envelope, Event
from nervus.codecs import JSON_CODEC
from nervus.transports import OutgoingMessage

CHANNEL = "bench.order"
SOURCE = "benchmarks"


class OrderPlaced(Event, type="bench.order.placed.v1", key="order_id"):
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount_cents: int
    currency: str
    sent_at: float
    note: str


def make_event(n: int, sent_at: float | None = None) -> OrderPlaced:
    return OrderPlaced(
        order_id=f"order-{n:010d}",
        customer_id=f"customer-{n % 9973:06d}",
        sku=f"SKU-{n % 512:05d}-BLUE-XL",
        quantity=1 + n % 5,
        amount_cents=1999 + n % 10000,
        currency="EUR",
        sent_at=time.time() if sent_at is None else sent_at,
        note="deliver to the back door, ring twice, leave with the neighbour if away",
    )


def to_message(event: OrderPlaced) -> OutgoingMessage:
    """What a service does to publish: encode, wrap in an envelope, binary-mode headers."""
    key = event.partition_key()
    envelope = Envelope.new(
        type=OrderPlaced.__message_type__,
        source=SOURCE,
        data=JSON_CODEC.encode(event),
        partitionkey=key,
    )
    return OutgoingMessage(key=key, headers=envelope.to_headers(), body=envelope.data)


def from_delivery(headers: dict[str, str], body: bytes) -> OrderPlaced:
    """What a consumer does: rebuild the envelope, resolve the type, decode the payload."""
    envelope = Envelope.from_headers(headers, body)
    if envelope.type != OrderPlaced.__message_type__:
        raise ValueError(f"unexpected event type {envelope.type!r}")
    return JSON_CODEC.decode(envelope.data, OrderPlaced, type_name=envelope.type)


def decode_body(body: bytes) -> OrderPlaced:
    """The payload alone decoded into the typed event (for queues without headers)."""
    return JSON_CODEC.decode(body, OrderPlaced, type_name=OrderPlaced.__message_type__)
