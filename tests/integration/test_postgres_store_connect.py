"""Connecting a PostgreSQL store while other processes' transactions write to its
tables (a service restarting beside running ones): the connect's table creation
must neither fail nor make those transactions fail."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from conftest import postgres_schema
from nervus.storage import EventStore, store_from_url

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
async def store_url(postgres_url: str) -> AsyncIterator[str]:
    async with postgres_schema(postgres_url, "nervus_connect") as url:
        yield url


async def test_connecting_beside_running_transactions(store_url: str) -> None:
    async with store_from_url(store_url) as store:
        async with store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {tx.namespace}effects (n INTEGER)")
        running = True
        committed = 0

        async def handle() -> None:  # what a handler with an inbox and an outbox writes
            nonlocal committed
            while running:
                async with store.transaction() as tx:
                    await tx.record_handled("group", uuid.uuid4().hex)
                    await tx.execute(f"INSERT INTO {tx.namespace}effects VALUES (1)")
                    await tx.enqueue("channel", "key", {"ce_id": uuid.uuid4().hex}, b"{}")
                committed += 1

        handlers = [asyncio.create_task(handle()) for _ in range(2)]
        try:
            for _ in range(8):
                other: EventStore = store_from_url(store_url)
                await other.connect()
                await other.close()
                assert not any(h.done() for h in handlers)  # none failed
        finally:
            running = False
            await asyncio.gather(*handlers)
    assert committed > 0
