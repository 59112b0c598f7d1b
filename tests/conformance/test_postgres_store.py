"""The PostgreSQL event store passes the shared store conformance suite, each
scenario in a schema of its own, dropped at the end."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from nervus.testing import EventStoreConformance

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


class TestPostgresEventStore(EventStoreConformance):
    @pytest.fixture
    async def store_url(self, postgres_url: str) -> AsyncIterator[str]:
        schema = f"nervus_store_{uuid.uuid4().hex[:12]}"
        separator = "&" if "?" in postgres_url else "?"
        yield f"{postgres_url}{separator}schema={schema}&poll_interval=0.5"
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()
