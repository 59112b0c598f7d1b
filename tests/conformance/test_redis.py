"""The Redis Streams transport passes the shared transport conformance suite."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from nervus.testing import TransportConformance

pytestmark = [pytest.mark.integration, pytest.mark.redis]


class TestRedisTransport(TransportConformance):
    rebalance_timeout = 8.0
    delivery_timeout = 10.0

    @pytest.fixture
    async def transport_url(self, redis_url: str) -> AsyncIterator[str]:
        """The server of ``redis_url`` under a key prefix of this test alone, whose keys
        are deleted afterwards."""
        prefix = f"nervus-test-{uuid.uuid4().hex[:12]}"
        yield (
            f"{redis_url}?prefix={prefix}&partitions=4&lease_seconds=2.5"
            "&heartbeat_seconds=0.25&block_seconds=0.1&commit_interval=0.01"
        )
        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
