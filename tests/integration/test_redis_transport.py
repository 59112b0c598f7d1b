"""What is specific to the Redis Streams transport: its layout in Redis as plain
clients see it, its URL options, connection failures, durability waits, trimming,
and how a group takes over entries left pending."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Start, Subscription, from_url
from nervus.transports.redis import RedisTransport
from nervus.transports.redis._layout import id_before, id_of, offset_of

pytestmark = [pytest.mark.integration, pytest.mark.redis]

CE_HEADERS = {
    "ce_specversion": "1.0",
    "ce_id": "0190b0c2-6a4e-7c3e-9a55-3f1f1c0e0a01",
    "ce_source": "/orders",
    "ce_type": "shop.order.placed.v1",
    "ce_time": "2026-01-02T03:04:05.678Z",
    "content-type": "application/json",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    name = f"nervus-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{name}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the same server."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def url_of(redis_url: str, prefix: str, **options: object) -> str:
    query = {
        "prefix": prefix,
        "partitions": 2,
        "lease_seconds": 1.5,
        "heartbeat_seconds": 0.25,
        "block_seconds": 0.1,
        "commit_interval": 0.01,
        **options,
    }
    return f"{redis_url}?{'&'.join(f'{k}={v}' for k, v in query.items())}"


async def open_transport(url: str) -> RedisTransport:
    transport = from_url(url)
    assert isinstance(transport, RedisTransport)
    await transport.connect()
    return transport


async def take(sub: Subscription, count: int, *, ack: bool = True) -> list[Delivery]:
    """Fetch until ``count`` deliveries came (bounded)."""
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            batch = await sub.fetch(count - len(got), 0.1)
            got.extend(batch)
            if ack and batch:
                await sub.ack(batch)
    return got


async def quiet(sub: Subscription, seconds: float = 0.3) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got.extend(await sub.fetch(10, 0.05))
    return got


# -- the layout plain clients see ------------------------------------------------------


async def test_published_message_readable_with_plain_xrange(
    redis_url: str, prefix: str, raw: aioredis.Redis
) -> None:
    async with await open_transport(url_of(redis_url, prefix, partitions=1)) as transport:
        body = b'{"order_id": "o-1", "amount_cents": 1250}'
        await transport.publish(
            "shop.orders", [OutgoingMessage(key="o-1", headers=CE_HEADERS, body=body)]
        )
        await transport.publish("shop.orders", [OutgoingMessage(key=None, headers={}, body=b"")])

    entries: Any = await raw.xrange(f"{prefix}:stream:shop.orders:0")
    assert len(entries) == 2
    (_, first), (_, second) = entries
    assert json.loads(first[b"headers"]) == CE_HEADERS
    assert first[b"body"] == body
    assert first[b"key"] == b"o-1"
    assert b"key" not in second, "a message without a partition key has no key field"
    assert await raw.get(f"{prefix}:channel:shop.orders") == b"1"


async def test_entry_added_by_plain_client_is_consumed(
    redis_url: str, prefix: str, raw: aioredis.Redis
) -> None:
    async with await open_transport(url_of(redis_url, prefix, partitions=1)) as transport:
        assert await transport.ensure_channel("payments") == 1
        entry_id: Any = await raw.xadd(
            f"{prefix}:stream:payments:0",
            {"headers": json.dumps(CE_HEADERS), "body": b"\x00raw\xff", "key": "p-7"},
        )
        sub = await transport.subscribe(["payments"], "billing")
        [d] = await take(sub, 1)
        assert d.headers == CE_HEADERS
        assert d.body == b"\x00raw\xff"
        assert d.key == "p-7"
        assert (d.channel, d.partition, d.attempt) == ("payments", 0, 1)
        assert d.offset == offset_of(entry_id)
        assert d.timestamp == int(entry_id.split(b"-")[0]) / 1000
        assert not await quiet(sub)


async def test_channel_and_group_names_with_colons_do_not_collide(
    redis_url: str, prefix: str
) -> None:
    async with await open_transport(url_of(redis_url, prefix, partitions=1)) as transport:
        await transport.publish("a:1", [OutgoingMessage(key=None, headers={"n": "a:1"}, body=b"")])
        await transport.publish("a", [OutgoingMessage(key=None, headers={"n": "a"}, body=b"")])
        assert await transport.ensure_channel("a:1", 3) == 1
        sub = await transport.subscribe(["a"], "g:x")
        [d] = await take(sub, 1)
        assert d.headers == {"n": "a"}
        assert not await quiet(sub)


def test_offsets_map_to_stream_ids_and_back() -> None:
    for entry_id in (b"1795710554209-0", b"1795710554209-7", b"1-0", b"0-1"):
        offset = offset_of(entry_id)
        assert id_of(offset).encode() == entry_id
    assert offset_of(b"10-1") > offset_of(b"10-0") > offset_of(b"9-99")
    assert id_before(offset_of(b"10-3")) == "10-2"
    assert id_before(offset_of(b"10-0")) == f"9-{2**64 - 1}"
    assert id_before(offset_of(b"0-1")) == "0-0"
    assert offset_of(b"1795710554209-0") < 2**63


# -- settings, connecting, durability ------------------------------------------------


def test_url_options_are_checked_all_at_once(redis_url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        from_url(f"{redis_url}?partitions=0&maxlen=10&retention_seconds=5&colour=blue")
    text = str(caught.value)
    assert "unknown option 'colour'" in text
    with pytest.raises(ConfigurationError) as caught:
        from_url(f"{redis_url}?partitions=0&maxlen=10&retention_seconds=5&heartbeat_seconds=9")
    problems = caught.value.problems
    assert any("partitions=0" in p for p in problems)
    assert any("maxlen or retention_seconds" in p for p in problems)
    assert any("heartbeat_seconds=9" in p for p in problems)
    with pytest.raises(ConfigurationError, match="database number"):
        from_url("redis://127.0.0.1:6379/zero")
    with pytest.raises(ConfigurationError, match="partitions"):
        from_url(f"{redis_url}?partitions=many")


async def test_unreachable_server_fails_connect_naming_the_url_without_password() -> None:
    transport = from_url("redis://nervus:s3cret@127.0.0.1:1/0?connect_timeout=2")
    async with asyncio.timeout(10):
        with pytest.raises(TransportUnavailable) as caught:
            await transport.connect()
    text = str(caught.value)
    assert "redis://nervus:***@127.0.0.1:1/0" in text
    assert "s3cret" not in text
    assert "onnect" in text  # the underlying error (connection refused) is part of it


async def test_wait_aof_refused_where_the_server_cannot_do_it(
    redis_url: str, prefix: str, raw: aioredis.Redis
) -> None:
    info = await raw.info("server")
    persistence = await raw.info("persistence")
    version = tuple(int(p) for p in str(info["redis_version"]).split(".")[:2])
    if version >= (7, 2) and int(persistence["aof_enabled"]):
        pytest.skip("this server has WAITAOF and an append-only file")
    transport = from_url(url_of(redis_url, prefix, wait_aof="true"))
    with pytest.raises(TransportError, match="wait_aof"):
        await transport.connect()
    await transport.close()


async def test_wait_replicas_fails_publish_when_too_few_replicas_acknowledge(
    redis_url: str, prefix: str, raw: aioredis.Redis
) -> None:
    replicas = int((await raw.info("replication")).get("connected_slaves", 0))
    url = url_of(redis_url, prefix, wait_replicas=replicas + 1, wait_timeout=0.2)
    async with await open_transport(url) as transport:
        with pytest.raises(TransportError, match="wait_replicas"):
            await transport.publish("waits", [OutgoingMessage(key=None, headers={}, body=b"x")])


async def test_maxlen_trims_partitions(redis_url: str, prefix: str, raw: aioredis.Redis) -> None:
    async with await open_transport(url_of(redis_url, prefix, partitions=1, maxlen=10)) as t:
        for _ in range(6):
            await t.publish("trimmed", [OutgoingMessage(None, {}, b"x") for _ in range(100)])
    length = await raw.xlen(f"{prefix}:stream:trimmed:0")
    assert 10 <= length < 600


async def test_retention_seconds_trims_old_entries(
    redis_url: str, prefix: str, raw: aioredis.Redis
) -> None:
    url = url_of(redis_url, prefix, partitions=1, retention_seconds=0.3)
    async with await open_transport(url) as t:
        for _ in range(3):
            await t.publish("aging", [OutgoingMessage(None, {}, b"x") for _ in range(100)])
        await asyncio.sleep(0.4)
        await t.publish("aging", [OutgoingMessage(None, {"n": "fresh"}, b"x")])
    entries: Any = await raw.xrange(f"{prefix}:stream:aging:0")
    assert len(entries) < 301, "entries older than retention_seconds were kept"
    assert json.loads(entries[-1][1][b"headers"]) == {"n": "fresh"}


# -- groups over the pending entries list -----------------------------------------------


async def test_unacked_entries_of_a_member_that_left_go_to_the_next_with_attempt_2(
    redis_url: str, prefix: str, raw: aioredis.Redis
) -> None:
    url = url_of(redis_url, prefix, partitions=1)
    async with await open_transport(url) as transport:
        await transport.publish(
            "pending", [OutgoingMessage(None, {"n": str(n)}, b"") for n in range(4)]
        )
        first = await transport.subscribe(["pending"], "workers")
        got = await take(first, 4, ack=False)
        await first.ack(got[:2])
        await first.close()

        second = await transport.subscribe(["pending"], "workers")
        again = await take(second, 2)
        assert [d.headers["n"] for d in again] == ["2", "3"]
        assert [d.attempt for d in again] == [2, 2]
        assert not await quiet(second)
        await second.close()

    stream = f"{prefix}:stream:pending:0"
    assert (await raw.xpending(stream, "workers"))["pending"] == 0
    assert await raw.xinfo_consumers(stream, "workers") == [], "finished consumers were kept"


async def test_nacked_message_survives_its_subscription(redis_url: str, prefix: str) -> None:
    url = url_of(redis_url, prefix, partitions=1)
    async with await open_transport(url) as transport:
        await transport.publish("retry", [OutgoingMessage("k", {"n": "1"}, b"body")])
        sub = await transport.subscribe(["retry"], "workers")
        [d] = await take(sub, 1, ack=False)
        await sub.nack(d, 0.3)
        await sub.close()

    async with await open_transport(url) as transport:
        sub = await transport.subscribe(["retry"], "workers")
        [again] = await take(sub, 1)
        assert (again.attempt, again.offset, again.body, again.key) == (2, d.offset, b"body", "k")
        assert not await quiet(sub)


async def test_replay_from_end_skips_what_is_there(redis_url: str, prefix: str) -> None:
    async with await open_transport(url_of(redis_url, prefix)) as transport:
        await transport.publish("tail", [OutgoingMessage(None, {"n": "old"}, b"")] * 3)
        sub = await transport.subscribe(["tail"], "late", start=Start.end())
        assert not await quiet(sub)
        await transport.publish("tail", [OutgoingMessage(None, {"n": "new"}, b"")])
        [d] = await take(sub, 1)
        assert d.headers == {"n": "new"}


@pytest.mark.integration
@pytest.mark.redis
async def test_many_concurrent_publishes_wait_for_a_connection_instead_of_failing(
    redis_url: str, prefix: str
) -> None:
    """Hundreds of handlers publishing at once share the pool; none is refused."""
    async with await open_transport(url_of(redis_url, prefix)) as transport:
        await transport.ensure_channel("burst", 2)
        await asyncio.gather(
            *(
                transport.publish("burst", [OutgoingMessage(key=f"k{n}", headers={}, body=b"x")])
                for n in range(500)
            )
        )
        sub = await transport.subscribe(["burst"], "burst-group")
        got: list[tuple[int, int]] = []
        async with asyncio.timeout(20):
            while len(got) < 500:
                batch = await sub.fetch(500, 0.5)
                got += [(d.partition, d.offset) for d in batch]
                await sub.ack(batch)
        assert len(set(got)) == 500
        await sub.close()


async def test_concurrent_publishes_share_pipelines_and_keep_their_order(
    redis_url: str, prefix: str
) -> None:
    async with await open_transport(url_of(redis_url, prefix)) as transport:
        await transport.ensure_channel("orders", 2)
        before = transport.publish_pipelines
        await asyncio.gather(
            *(
                transport.publish("orders", [OutgoingMessage("k", {"n": str(n)}, b"x")])
                for n in range(200)
            )
        )
        assert transport.publish_pipelines - before < 20
        sub = await transport.subscribe(["orders"], "readers")
        got = await take(sub, 200)
        assert [int(d.headers["n"]) for d in got] == list(range(200))
        await sub.close()


async def test_a_publish_that_fails_in_a_shared_pipeline_fails_alone(
    redis_url: str, prefix: str, raw: aioredis.Redis
) -> None:
    async with await open_transport(url_of(redis_url, prefix, partitions=1)) as transport:
        await transport.ensure_channel("good")
        await transport.ensure_channel("broken")
        await raw.set(f"{prefix}:stream:broken:0", "not a stream")
        before = transport.publish_pipelines
        outcomes = await asyncio.gather(
            *(
                transport.publish(
                    "broken" if n == 5 else "good", [OutgoingMessage(None, {"n": str(n)}, b"")]
                )
                for n in range(10)
            ),
            return_exceptions=True,
        )
        assert transport.publish_pipelines - before < 10, "the calls did not share a pipeline"
        error = outcomes.pop(5)
        assert isinstance(error, TransportError)
        assert not error.retryable
        assert error.channel == "broken"
        assert "WRONGTYPE" in str(error)
        assert outcomes == [None] * 9
        entries: Any = await raw.xrange(f"{prefix}:stream:good:0")
        assert [json.loads(e[1][b"headers"])["n"] for e in entries] == [
            str(n) for n in range(10) if n != 5
        ]
