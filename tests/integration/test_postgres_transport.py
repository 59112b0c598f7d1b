"""The PostgreSQL transport's own behaviour: URL options, connecting, the tables it
writes, offsets that become visible in order (no reader ever skips one), group
commit, retries that survive the consumer, concurrent first starts, and waking up
again after the LISTEN connection dropped. Every test uses a schema of its own,
dropped at the end."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Start, Subscription, from_url
from nervus.transports._contract import partition_for
from nervus.transports.postgres import PostgresSettings, PostgresTransport
from nervus.transports.postgres import _log as postgres_log
from nervus.transports.postgres._arrays import bytea_array, int4_array, int8_array, text_array
from nervus.transports.postgres._schema import SCHEMA_VERSION

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

FAST = "lease_seconds=1.5&heartbeat_seconds=0.25&commit_interval=0.01&poll_interval=0.5"


def msg(n: int, key: str | None = None, **headers: str) -> OutgoingMessage:
    return OutgoingMessage(
        key=key, headers={"n": str(n), "x-text": "é", **headers}, body=f"body-{n}\x00".encode()
    )


def with_options(url: str, options: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{options}"


class SchemaUrls:
    """URLs of one schema used by one test alone: ``urls()``, ``urls(partitions=16)``."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.schema = f"nervus_test_{uuid.uuid4().hex[:12]}"

    def __call__(self, options: str = "", **more: object) -> str:
        extra = "&".join(f"{k}={v}" for k, v in more.items())
        base = f"schema={self.schema}&partitions=4&{FAST}"
        return with_options(self.server_url, "&".join(q for q in (base, options, extra) if q))


@pytest.fixture
async def schema_url(postgres_url: str) -> AsyncIterator[SchemaUrls]:
    """Makes URLs of a schema used by this test alone, dropped at the end."""
    urls = SchemaUrls(postgres_url)
    yield urls
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("SET lock_timeout = '10s'")
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(urls.schema))
        )


@pytest.fixture
async def transport(schema_url: SchemaUrls) -> AsyncIterator[PostgresTransport]:
    t = PostgresTransport.from_url(schema_url())
    await t.connect()
    try:
        yield t
    finally:
        await t.close()


async def drain(sub: Subscription, count: int, *, ack: bool = True) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            batch = await sub.fetch(count - len(got), 0.2)
            got.extend(batch)
            if ack and batch:
                await sub.ack(batch)
    return got


async def raw(postgres_url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(postgres_url, autocommit=True)


# -- URL and settings ----------------------------------------------------------------


def test_nervus_options_are_read_and_libpq_options_pass_through() -> None:
    t = PostgresTransport.from_url(
        "postgresql://u:secret@db.example:6543/app?schema=orders_log&partitions=16"
        "&application_name=shop&sslmode=prefer&lease_seconds=6"
    )
    assert t.settings.schema == "orders_log"
    assert t.settings.partitions == 16
    assert t.settings.lease_seconds == 6
    assert t.settings.heartbeat == 1.5
    assert "secret" not in t.url and "secret" not in repr(t)
    info = psycopg.conninfo.conninfo_to_dict(t._conninfo)
    assert info["application_name"] == "shop"
    assert info["sslmode"] == "prefer"
    assert "schema" not in info and "partitions" not in info


def test_every_bad_option_is_reported_naming_it_without_the_password() -> None:
    url = (
        "postgresql://u:secret@127.0.0.1/db?schema=Bad-Name&partitions=0&lease_seconds=3"
        "&heartbeat_seconds=2&poll_interval=0"
    )
    with pytest.raises(ConfigurationError) as info:
        from_url(url, key="NERVUS_TRANSPORT")
    text = "\n".join(info.value.problems)
    for name in ("schema='Bad-Name'", "partitions=0", "heartbeat_seconds=2", "poll_interval=0"):
        assert name in text
    assert all(p.startswith("NERVUS_TRANSPORT") for p in info.value.problems)
    assert "secret" not in text


def test_unknown_option_names_both_option_lists() -> None:
    with pytest.raises(ConfigurationError) as info:
        from_url("postgresql://u:secret@127.0.0.1/db?partitionz=3&lease_seconds=x")
    text = "\n".join(info.value.problems)
    assert "unknown option 'partitionz'" in text
    assert "schema" in text and "libpq" in text
    assert "secret" not in text


def test_defaults_are_valid() -> None:
    settings = PostgresSettings()
    assert settings.validate() == []
    assert settings.schema == "nervus"
    assert settings.notify_channel == "nervus.nervus"


async def test_unreachable_server_fails_within_the_timeout_naming_the_url() -> None:
    # Nothing listens on port 1 of the loopback: refused at once.
    t = from_url("postgresql://u:secret@127.0.0.1:1/db?connect_timeout=2")
    started = time.monotonic()
    with pytest.raises(TransportUnavailable) as info:
        await t.connect()
    assert time.monotonic() - started < 10
    text = str(info.value)
    assert "127.0.0.1:1" in text and "u:***@" in text and "secret" not in text
    assert info.value.retryable


async def test_wrong_password_fails_naming_the_cause(postgres_url: str) -> None:
    parts = psycopg.conninfo.conninfo_to_dict(postgres_url)
    url = (
        f"postgresql://{parts.get('user', 'nervus')}:wrong-password@{parts.get('host')}:"
        f"{parts.get('port', 5432)}/{parts.get('dbname', 'nervus')}?connect_timeout=5"
    )
    t = from_url(url)
    with pytest.raises(TransportUnavailable, match="password") as info:
        await t.connect()
    assert "wrong-password" not in str(info.value)
    await t.close()


async def test_publish_before_connect_and_after_close(schema_url: SchemaUrls) -> None:
    t = from_url(schema_url())
    with pytest.raises(TransportUnavailable, match="connect"):
        await t.publish("c", [msg(1)])
    await t.connect()
    await t.close()
    with pytest.raises(TransportError, match="closed"):
        await t.publish("c", [msg(1)])


# -- tables ----------------------------------------------------------------------------


async def test_concurrent_first_starts_create_the_tables_once(
    schema_url: SchemaUrls,
) -> None:
    transports = [from_url(schema_url()) for _ in range(4)]
    await asyncio.gather(*(t.connect() for t in transports))
    try:
        counts = await asyncio.gather(*(t.ensure_channel("shared", 3) for t in transports))
        assert counts == [3, 3, 3, 3]
    finally:
        for t in transports:
            await t.close()


async def test_schema_of_another_version_is_refused(
    schema_url: SchemaUrls, postgres_url: str
) -> None:
    async with from_url(schema_url()):
        pass
    schema = schema_url.schema
    async with await raw(postgres_url) as conn:
        await conn.execute(
            sql.SQL("UPDATE {}.meta SET value = '999' WHERE name = 'schema_version'").format(
                sql.Identifier(schema)
            )
        )
    t = from_url(schema_url())
    with pytest.raises(TransportError, match="version 999"):
        await t.connect()
    async with await raw(postgres_url) as conn:  # the cause is gone: connecting again works
        await conn.execute(
            sql.SQL("UPDATE {}.meta SET value = %s WHERE name = 'schema_version'").format(
                sql.Identifier(schema)
            ),
            (str(SCHEMA_VERSION),),
        )
    await t.connect()
    await t.publish("c", [msg(1)])
    await t.close()


async def test_messages_are_rows_with_json_headers_key_and_body(
    transport: PostgresTransport, postgres_url: str
) -> None:
    await transport.publish(
        "orders", [msg(1, key="order-1", ce_id="abc", ce_type="shop.order.placed.v1")]
    )
    async with await raw(postgres_url) as conn:
        cur = await conn.execute(
            sql.SQL(
                "SELECT l.off, l.key, convert_from(l.headers, 'UTF8')::jsonb, l.body "
                "FROM {s}.log AS l "
                "JOIN {s}.channels AS c ON c.id = l.chan WHERE c.name = 'orders'"
            ).format(s=sql.Identifier(transport.settings.schema))
        )
        rows = await cur.fetchall()
    assert rows == [
        (
            0,
            "order-1",
            {"n": "1", "x-text": "é", "ce_id": "abc", "ce_type": "shop.order.placed.v1"},
            b"body-1\x00",
        )
    ]


async def test_existing_partition_count_wins_across_transports(
    schema_url: SchemaUrls,
) -> None:
    async with from_url(schema_url()) as first:
        assert await first.ensure_channel("orders", 3) == 3
        assert await first.ensure_channel("orders", 12) == 3
        assert await first.ensure_channel("defaulted") == 4
    async with from_url(schema_url(partitions=16)) as second:
        assert await second.ensure_channel("orders") == 3
        assert await second.ensure_channel("new") == 16


# -- publishing and offsets ------------------------------------------------------------


async def test_binary_array_parameters_reach_the_server_intact(postgres_url: str) -> None:
    cases: list[tuple[Any, str, list[Any]]] = [
        (int4_array([1, -2, 2**31 - 1, -(2**31)]), "integer", [1, -2, 2**31 - 1, -(2**31)]),
        (int4_array([]), "integer", []),
        (int8_array([0, -(2**63), 2**63 - 1]), "bigint", [0, -(2**63), 2**63 - 1]),
        (text_array(["a", "é€😀", ""]), "text", ["a", "é€😀", ""]),
        (text_array([None, "x", None]), "text", [None, "x", None]),
        (bytea_array([b"", b"\x00\xff", b"abc"]), "bytea", [b"", b"\x00\xff", b"abc"]),
    ]
    async with await raw(postgres_url) as conn:
        for value, element, expected in cases:
            query = sql.SQL("SELECT %b::{}[]").format(sql.SQL(element))
            cur = await conn.execute(query, (value,))
            assert await cur.fetchone() == (expected,)


async def test_offsets_are_dense_per_partition_and_keys_stay_put(
    transport: PostgresTransport,
) -> None:
    await transport.ensure_channel("c", 3)
    for start in range(0, 30, 10):
        await transport.publish("c", [msg(n, key=f"k{n % 5}") for n in range(start, start + 10)])
    sub = await transport.subscribe(["c"], "g")
    got = await drain(sub, 30)
    by_partition: dict[int, list[int]] = {}
    partition_of: dict[str | None, int] = {}
    for d in got:
        by_partition.setdefault(d.partition, []).append(d.offset)
        assert partition_of.setdefault(d.key, d.partition) == d.partition
        assert d.partition == partition_for(d.key, 3, 0)
        assert d.body == f"body-{d.headers['n']}\x00".encode()
        assert d.timestamp > 0
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))


async def test_concurrent_publishes_share_transactions(transport: PostgresTransport) -> None:
    await transport.ensure_channel("c")
    before = transport.publish_transactions
    await asyncio.gather(*(transport.publish("c", [msg(n, key="k")]) for n in range(100)))
    assert transport.publish_transactions - before < 50
    sub = await transport.subscribe(["c"], "g")
    got = await drain(sub, 100)
    assert [int(d.headers["n"]) for d in got] == list(range(100))


async def test_a_bad_publish_fails_alone_in_a_shared_transaction(
    transport: PostgresTransport,
) -> None:
    await transport.ensure_channel("c")
    # text cannot hold U+0000: the server refuses this message's key.
    results = await asyncio.gather(
        transport.publish("c", [msg(1, key="k")]),
        transport.publish("c", [msg(2, key="k\x00")]),
        transport.publish("c", [msg(3, key="k")]),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], TransportError)
    assert "'c'" in str(results[1])
    sub = await transport.subscribe(["c"], "g")
    got = await drain(sub, 2)
    assert sorted(int(d.headers["n"]) for d in got) == [1, 3]
    assert not await sub.fetch(10, 0.2)


async def test_a_writer_that_allocated_first_is_never_skipped(
    transport: PostgresTransport, postgres_url: str
) -> None:
    """Writer A takes offsets 0-4 and holds its transaction open; writer B publishes
    to the same partition meanwhile. B waits for A's row lock, so it cannot commit
    offsets 5-9 before A commits 0-4, and a reader polling all along never sees a
    gap it would skip."""
    schema = transport.settings.schema
    cid, _ = await transport._channel("c", 1)
    sub = await transport.subscribe(["c"], "g")
    async with transport.writer.use() as conn:
        writer_pid = conn.info.backend_pid
    first = [
        postgres_log.Pending(
            cid,
            [0] * 5,
            [None] * 5,
            [postgres_log.encode_headers({"n": str(n)}) for n in range(5)],
            [b"a"] * 5,
        )
    ]
    async with await raw(postgres_url) as a, await raw(postgres_url) as observer:
        async with a.transaction():
            await postgres_log.append(a, schema, transport.settings.notify_channel, first)
            second = asyncio.create_task(transport.publish("c", [msg(n) for n in range(5, 10)]))
            async with asyncio.timeout(10):
                while True:
                    cur = await observer.execute(
                        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                        (writer_pid,),
                    )
                    row = await cur.fetchone()
                    if row is not None and row[0] == "Lock":
                        break  # B waits for A's lock on the partition
                    await asyncio.sleep(0.01)
            assert not await sub.fetch(10, 0.1), "read offsets of an uncommitted writer"
            assert not second.done()
        await asyncio.wait_for(second, 10)
    got = await drain(sub, 10)
    assert [d.offset for d in got] == list(range(10))
    assert [int(d.headers["n"]) for d in got] == list(range(10))


async def test_concurrent_writers_never_make_a_reader_skip(
    schema_url: SchemaUrls,
) -> None:
    """Several processes' worth of writers append to one partition while a reader
    follows the log; offsets it reads are contiguous and it misses nothing."""
    writers = [from_url(schema_url()) for _ in range(4)]
    reader = from_url(schema_url())
    for t in (*writers, reader):
        await t.connect()
    try:
        await reader.ensure_channel("c", 1)
        sub = await reader.subscribe(["c"], "g")
        per_writer, batch = 60, 3

        async def write(i: int, t: Any) -> None:
            for start in range(0, per_writer, batch):
                ns = range(i * per_writer + start, i * per_writer + start + batch)
                await t.publish("c", [msg(n, key="one") for n in ns])

        writing = asyncio.gather(*(write(i, t) for i, t in enumerate(writers)))
        offsets: list[int] = []
        async with asyncio.timeout(20):
            while len(offsets) < per_writer * len(writers):
                got = await sub.fetch(7, 0.05)
                offsets += [d.offset for d in got]
                await sub.ack(got)
        await writing
        assert offsets == list(range(per_writer * len(writers)))
    finally:
        for t in (*writers, reader):
            await t.close()


async def test_writers_spanning_many_partitions_never_deadlock(
    schema_url: SchemaUrls,
) -> None:
    """Keyless batches touch every partition; writers lock partitions in one order,
    so concurrent writers wait for each other instead of deadlocking."""
    writers = [from_url(schema_url()) for _ in range(4)]
    for t in writers:
        await t.connect()
    try:
        await writers[0].ensure_channel("c", 4)

        async def write(i: int, t: Any) -> None:
            for b in range(10):
                await t.publish("c", [msg(i * 1000 + b * 20 + n) for n in range(20)])

        await asyncio.wait_for(asyncio.gather(*(write(i, t) for i, t in enumerate(writers))), 30)
        sub = await writers[0].subscribe(["c"], "g")
        got = await drain(sub, 800)
        by_partition: dict[int, list[int]] = {}
        for d in got:
            by_partition.setdefault(d.partition, []).append(d.offset)
        assert sum(len(o) for o in by_partition.values()) == 800
        for offsets in by_partition.values():
            assert offsets == list(range(len(offsets)))
    finally:
        for t in writers:
            await t.close()


# -- consuming -------------------------------------------------------------------------


async def test_nacked_message_survives_its_consumer(schema_url: SchemaUrls) -> None:
    async with from_url(schema_url()) as first:
        await first.publish("c", [msg(1, key="k"), msg(2, key="k")])
        sub = await first.subscribe(["c"], "g")
        one, two = await drain(sub, 2, ack=False)
        await sub.nack(one, 0.3)
        await sub.ack([two])
    # the first consumer is gone; its nack is in the database
    async with from_url(schema_url()) as second:
        sub = await second.subscribe(["c"], "g")
        [again] = await drain(sub, 1)
        assert again.headers["n"] == "1"
        assert again.attempt == 2
        assert not await sub.fetch(10, 0.3)


async def test_replay_from_end_skips_history(transport: PostgresTransport) -> None:
    await transport.publish("c", [msg(n) for n in range(5)])
    sub = await transport.subscribe(["c"], "g", start=Start.end())
    assert not await sub.fetch(10, 0.2)
    await transport.publish("c", [msg(5)])
    [d] = await drain(sub, 1)
    assert d.headers["n"] == "5"


async def test_fetch_is_woken_by_a_publish_of_another_transport(
    schema_url: SchemaUrls,
) -> None:
    async with (
        from_url(schema_url(poll_interval=30)) as consumer,
        from_url(schema_url()) as producer,
    ):
        await consumer.ensure_channel("c")
        sub = await consumer.subscribe(["c"], "g")
        waiting = asyncio.create_task(sub.fetch(10, 20))
        await asyncio.sleep(0.1)
        await producer.publish("c", [msg(1)])
        got = await asyncio.wait_for(waiting, 10)  # far below poll_interval: notified
        assert [d.headers["n"] for d in got] == ["1"]


async def test_consumer_wakes_again_after_its_listen_connection_dropped(
    schema_url: SchemaUrls, postgres_url: str
) -> None:
    async with (
        from_url(schema_url(poll_interval=30)) as consumer,
        from_url(schema_url()) as producer,
    ):
        assert isinstance(consumer, PostgresTransport)
        await consumer.ensure_channel("c")
        sub = await consumer.subscribe(["c"], "g")
        listener = consumer._listener._conn
        assert listener is not None
        waiting = asyncio.create_task(sub.fetch(10, 20))
        await asyncio.sleep(0.2)  # the fetch found nothing and waits to be woken
        async with await raw(postgres_url) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (listener.info.backend_pid,))
        # Published while the listener may still be reconnecting: its notification can
        # be lost, and the reconnection wakes the consumer instead.
        await producer.publish("c", [msg(1)])
        got = await asyncio.wait_for(waiting, 10)  # far below poll_interval
        assert [d.headers["n"] for d in got] == ["1"]
        assert consumer._listener._conn is not listener


async def test_a_member_takes_over_when_the_other_closes(
    schema_url: SchemaUrls,
) -> None:
    async with from_url(schema_url()) as a, from_url(schema_url()) as b:
        count = await a.ensure_channel("c", 4)
        first = await a.subscribe(["c"], "g")
        second = await b.subscribe(["c"], "g")
        async with asyncio.timeout(10):
            while len(first.assignment()) + len(second.assignment()) != count or not (
                first.assignment() and second.assignment()
            ):
                await asyncio.gather(first.fetch(1, 0.05), second.fetch(1, 0.05))
        await second.close()
        async with asyncio.timeout(10):
            while len(first.assignment()) != count:
                await first.fetch(1, 0.05)
