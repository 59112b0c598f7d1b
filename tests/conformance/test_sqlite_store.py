"""The SQLite event store passes the shared store conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from nervus.testing import EventStoreConformance

pytestmark = pytest.mark.unit


class TestSqliteEventStore(EventStoreConformance):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/store.db"
