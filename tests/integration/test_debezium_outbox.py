"""The Debezium-compatible outbox layout on PostgreSQL: rows carry the columns
Debezium's outbox event router reads, and nervus's own relay still publishes them."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from nervus import Event, Service, Settings
from nervus.errors import ConfigurationError
from nervus.storage import store_from_url
from nervus.transports import from_url

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


class InvoiceIssued(Event, type="dbz.invoice.issued.v1", key="invoice_id"):
    invoice_id: str
    cents: int


@pytest.fixture
async def schema(postgres_url: str) -> AsyncIterator[str]:
    name = f"nervus_dbz_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


async def test_rows_have_the_debezium_columns_and_are_relayed(
    postgres_url: str, schema: str
) -> None:
    store = f"{postgres_url}?schema={schema}&outbox_layout=debezium"
    memory = f"memory://{uuid.uuid4().hex}"
    billing = Service("billing", settings=Settings(transport=memory, store=store), outbox=True)
    async with billing:
        async with billing.transaction() as tx:
            await tx.publish(InvoiceIssued(invoice_id="inv-7", cents=1250))
        conn = await asyncpg.connect(postgres_url)
        try:
            (row,) = await conn.fetch(
                f"SELECT id, aggregatetype, aggregateid, type, payload, headers "
                f"FROM {schema}.outbox"
            )
        finally:
            await conn.close()
        watcher = from_url(memory)
        async with watcher:
            sub = await watcher.subscribe(["dbz.invoice"], "watcher")
            got = []
            while not got:
                got = list(await sub.fetch(10, 0.2))
    headers = json.loads(row["headers"])
    assert row["id"] == headers["ce_id"] == got[0].headers["ce_id"]
    assert row["aggregatetype"] == "dbz.invoice"  # the channel: Debezium routes by it
    assert row["aggregateid"] == "inv-7" == got[0].key  # the key
    assert row["type"] == "dbz.invoice.issued.v1"
    assert json.loads(row["payload"]) == {"invoice_id": "inv-7", "cents": 1250}
    assert headers["ce_source"] == "/nervus/billing"
    assert got[0].body == row["payload"]


async def test_a_schema_of_the_other_layout_is_refused(postgres_url: str, schema: str) -> None:
    async with store_from_url(f"{postgres_url}?schema={schema}"):
        pass  # the nervus layout
    store = store_from_url(f"{postgres_url}?schema={schema}&outbox_layout=debezium")
    with pytest.raises(ConfigurationError, match="has the nervus layout; use outbox_layout=nervus"):
        await store.connect()
    with pytest.raises(ConfigurationError, match="outbox_layout"):
        store_from_url(f"{postgres_url}?schema={schema}&outbox_layout=kafka-connect")
