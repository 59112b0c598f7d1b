"""The PostgreSQL transport passes the shared transport conformance suite, each
scenario in a schema of its own, dropped at the end."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql

from nervus.testing import TransportConformance

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


class TestPostgresTransport(TransportConformance):
    rebalance_timeout = 8.0
    delivery_timeout = 10.0

    @pytest.fixture
    async def transport_url(self, postgres_url: str) -> AsyncIterator[str]:
        schema = f"nervus_test_{uuid.uuid4().hex[:12]}"
        separator = "&" if "?" in postgres_url else "?"
        yield (
            f"{postgres_url}{separator}schema={schema}&partitions=4&lease_seconds=2.5"
            "&heartbeat_seconds=0.25&commit_interval=0.01&poll_interval=0.5"
        )
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
            await conn.execute("SET lock_timeout = '10s'")
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )
