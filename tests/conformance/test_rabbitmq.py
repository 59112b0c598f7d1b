"""The RabbitMQ transport passes the shared transport conformance suite on a real broker."""

from __future__ import annotations

import pytest

from nervus.testing import TransportConformance

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


class TestRabbitTransport(TransportConformance):
    rebalance_timeout = 10.0
    delivery_timeout = 10.0

    @pytest.fixture
    def transport_url(self, rabbitmq_url: str) -> str:
        separator = "&" if "?" in rabbitmq_url else "?"
        return (
            f"{rabbitmq_url}{separator}partitions=4&heartbeat_seconds=0.2&session_seconds=2"
            "&commit_interval=0.05&connect_timeout=5"
        )
