"""The SQLite transport passes the shared transport conformance suite."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from nervus.testing import TransportConformance


class TestSqliteTransport(TransportConformance):
    rebalance_timeout = 8.0
    delivery_timeout = 10.0

    @pytest.fixture
    def transport_url(self, tmp_path: Path) -> str:
        path = tmp_path / f"log-{uuid.uuid4().hex[:8]}.db"
        return (
            f"sqlite:///{path}?partitions=4&lease_seconds=1.5&heartbeat_seconds=0.25"
            "&poll_interval=0.005&commit_interval=0.01"
        )
