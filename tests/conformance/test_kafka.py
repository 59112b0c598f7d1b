"""The Kafka transport passes the shared transport conformance suite on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from nervus.testing import Scenario, TransportConformance

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


def delete_named(bootstrap_servers: str, token: str) -> None:
    """Delete the topics and consumer groups whose names carry ``token`` (one
    scenario's), so the shared broker does not fill up with test topics. Best
    effort: what cannot be deleted now (a group a killed member still holds)
    is left to the broker's retention."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    with contextlib.suppress(KafkaException):
        topics = [t for t in admin.list_topics(timeout=10).topics if token in t]
        if topics:
            for future in admin.delete_topics(topics, operation_timeout=30).values():
                future.result()
    with contextlib.suppress(KafkaException):
        listed = admin.list_consumer_groups(request_timeout=10).result()
        groups = [g.group_id for g in listed.valid if token in g.group_id]
        if groups:
            for future in admin.delete_consumer_groups(groups, request_timeout=10).values():
                with contextlib.suppress(KafkaException):
                    future.result()


class TestKafkaTransport(TransportConformance):
    # A killed member keeps its partitions until its session times out (6 s, the
    # broker's minimum), then the group rebalances.
    rebalance_timeout = 20.0
    delivery_timeout = 15.0
    scenario_timeout = 90.0

    @pytest.fixture
    def transport_url(self, kafka_url: str) -> str:
        return (
            f"{kafka_url}?partitions=4&session_timeout=6&heartbeat_interval=0.5"
            "&linger_ms=1&commit_interval=0.02&connect_timeout=5"
        )

    @asynccontextmanager
    async def scenario(self, url: str) -> AsyncIterator[Scenario]:
        token = None
        try:
            async with super().scenario(url) as s:
                token = s.token
                yield s
        finally:
            if token is not None:
                bootstrap = url.partition("://")[2].partition("?")[0]
                await asyncio.to_thread(delete_named, bootstrap, token)
