"""The NATS JetStream transport passes the shared transport conformance suite."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from nervus.testing import TransportConformance

pytestmark = [pytest.mark.integration, pytest.mark.nats]


async def delete_namespace(url: str, namespace: str) -> None:
    """Delete the streams and the groups bucket a test's namespace created."""
    import nats

    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=10)
        for name in await js.streams_info():
            stream = name.config.name or ""
            if stream.startswith(f"{namespace}_") or stream == f"KV_{namespace}-groups":
                await js.delete_stream(stream)
    finally:
        await nc.close()


class TestNatsTransport(TransportConformance):
    rebalance_timeout = 10.0
    delivery_timeout = 10.0

    @pytest.fixture
    async def transport_url(self, nats_url: str) -> AsyncIterator[str]:
        namespace = f"test-{uuid.uuid4().hex[:10]}"
        yield (
            f"{nats_url}?partitions=4&namespace={namespace}&lease_seconds=1.5"
            "&heartbeat_seconds=0.25&ack_wait=3&check_interval=0.05"
        )
        await delete_namespace(nats_url, namespace)
