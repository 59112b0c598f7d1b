"""What the crash tests share: reading back everything a channel holds."""

from __future__ import annotations

import uuid

from nervus.transports import Delivery, from_url


async def read_everything(url: str, channel: str, *, idle: float) -> list[Delivery]:
    """Every message of ``channel`` on the transport at ``url``, read by a fresh
    group until a fetch waits ``idle`` seconds in vain, in partition order (a key's
    messages share a partition)."""
    transport = from_url(url)
    await transport.connect()
    got: list[Delivery] = []
    try:
        sub = await transport.subscribe([channel], f"check-{uuid.uuid4().hex[:6]}")
        while batch := await sub.fetch(1000, idle):
            got.extend(batch)
        await sub.ack(got)
    finally:
        await transport.close()
    return sorted(got, key=lambda d: (d.partition, d.offset))
