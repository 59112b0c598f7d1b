"""What the RabbitMQ tests that break a connection share: numbered messages, and
fetching until every one of them came."""

from __future__ import annotations

import asyncio

from nervus.errors import TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Subscription


def messages(batch: str, count: int) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(f"key-{i % 3}", {"ce_id": f"{batch}-{i}"}, f"{batch} {i}".encode())
        for i in range(count)
    ]


def ids(items: list[OutgoingMessage] | list[Delivery]) -> set[str]:
    return {m.headers["ce_id"] for m in items}


async def fetch_ids(sub: Subscription, wanted: set[str], timeout: float) -> list[Delivery]:
    """Fetch until every id of ``wanted`` came, retrying while the broker is
    unreachable; returns every delivery fetched."""
    got: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while not wanted <= ids(got):
            try:
                got.extend(await sub.fetch(100, 0.2))
            except TransportUnavailable:
                await asyncio.sleep(0.1)
    return got
