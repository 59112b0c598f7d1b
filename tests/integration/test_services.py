"""Smoke tests for the servers behind the integration suite.

One test per server with its raw client, no nervus code: connect, write, read
back. When one of these fails, the backend tests of that server cannot pass
either, so look here first. ``scripts/services up`` starts them all.
"""

from __future__ import annotations

import time
import uuid

import pytest


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.mark.integration
@pytest.mark.postgres
async def test_postgres_write_and_read(postgres_url: str) -> None:
    import psycopg
    from psycopg.types.json import Jsonb

    key = unique("smoke")
    connect = psycopg.AsyncConnection.connect(postgres_url, connect_timeout=10)
    async with await connect as conn, conn.cursor() as cur:
        await cur.execute("CREATE TEMPORARY TABLE smoke (id text PRIMARY KEY, body jsonb NOT NULL)")
        await cur.execute(
            "INSERT INTO smoke (id, body) VALUES (%s, %s)", (key, Jsonb({"amount_cents": 42}))
        )
        await conn.commit()
        await cur.execute("SELECT body FROM smoke WHERE id = %s", (key,))
        assert await cur.fetchone() == ({"amount_cents": 42},)
        await cur.execute("SELECT current_setting('server_version_num')::int")
        row = await cur.fetchone()
        assert row is not None
        assert row[0] >= 150000


@pytest.mark.integration
@pytest.mark.redis
async def test_redis_stream_write_and_read(redis_url: str) -> None:
    import redis.asyncio as redis

    stream, group = unique("nervus-smoke"), "smoke"
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=10)
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
        entry_id = await client.xadd(stream, {"type": "shop.order.placed.v1", "data": "42"})
        batches = await client.xreadgroup(group, "member-1", {stream: ">"}, count=10, block=1000)
        assert len(batches) == 1
        _, entries = batches[0]
        assert entries == [(entry_id, {b"type": b"shop.order.placed.v1", b"data": b"42"})]
        assert await client.xack(stream, group, entry_id) == 1
    finally:
        await client.delete(stream)
        await client.aclose()


@pytest.mark.integration
@pytest.mark.nats
async def test_nats_jetstream_publish_and_pull(nats_url: str) -> None:
    import nats

    stream = unique("NERVUS_SMOKE").replace("-", "_")
    subject = f"{stream}.orders"
    nc = await nats.connect(nats_url, connect_timeout=10, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(subject, b'{"amount_cents":42}', headers={"ce-id": "1"})
        assert ack.stream == stream
        assert ack.seq == 1
        sub = await js.pull_subscribe(subject, durable="smoke", stream=stream)
        messages = await sub.fetch(1, timeout=10)
        assert [m.data for m in messages] == [b'{"amount_cents":42}']
        assert messages[0].headers == {"ce-id": "1"}
        await messages[0].ack_sync(timeout=10)
        await sub.unsubscribe()
        await js.delete_stream(stream)
    finally:
        await nc.close()


@pytest.mark.integration
@pytest.mark.rabbitmq
async def test_rabbitmq_queue_publish_and_get(rabbitmq_url: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(unique("nervus-smoke"), exclusive=True)
        message = aio_pika.Message(
            b'{"amount_cents":42}', message_id="1", headers={"ce_type": "shop.order.placed.v1"}
        )
        await channel.default_exchange.publish(message, routing_key=queue.name)
        received = await queue.get(timeout=10)
        assert received.body == b'{"amount_cents":42}'
        assert received.message_id == "1"
        assert received.headers == {"ce_type": "shop.order.placed.v1"}
        await received.ack()
        assert await queue.get(fail=False) is None


@pytest.mark.integration
@pytest.mark.rabbitmq
async def test_rabbitmq_stream_queue_and_plugins(
    rabbitmq_url: str, rabbitmq_stream_url: str
) -> None:
    """A stream queue replays from the first offset; the consistent-hash
    exchange and the stream protocol port are there (their plugins are on)."""
    import aio_pika

    connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=10)
        name = unique("nervus-smoke-stream")
        exchange = await channel.declare_exchange(
            unique("nervus-smoke-hash"), "x-consistent-hash", auto_delete=True
        )
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "stream"}
        )
        try:
            await queue.bind(exchange, routing_key="1")
            for n in range(3):
                await exchange.publish(aio_pika.Message(str(n).encode()), routing_key=f"key-{n}")

            bodies: list[bytes] = []
            async with queue.iterator(arguments={"x-stream-offset": "first"}) as messages:
                async for message in messages:
                    bodies.append(message.body)
                    await message.ack()
                    if len(bodies) == 3:
                        break
            assert bodies == [b"0", b"1", b"2"]
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()


@pytest.mark.integration
@pytest.mark.kafka
def test_kafka_produce_and_consume(kafka_bootstrap_servers: str) -> None:
    from confluent_kafka import Consumer, KafkaError, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = unique("nervus-smoke")
    common = {"bootstrap.servers": kafka_bootstrap_servers, "socket.timeout.ms": 10_000}
    admin = AdminClient(common)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(
        timeout=30
    )
    try:
        delivered: list[tuple[KafkaError | None, int | None]] = []
        producer = Producer({**common, "enable.idempotence": True, "acks": "all"})
        producer.produce(
            topic,
            key=b"order-1",
            value=b'{"amount_cents":42}',
            headers=[("ce_type", b"shop.order.placed.v1")],
            on_delivery=lambda err, msg: delivered.append((err, msg.offset())),
        )
        assert producer.flush(30) == 0
        assert delivered == [(None, 0)]

        consumer = Consumer(
            {
                **common,
                "group.id": unique("nervus-smoke"),
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.subscribe([topic])
            deadline = time.monotonic() + 60
            message = None
            while message is None and time.monotonic() < deadline:
                message = consumer.poll(1.0)
                if message is not None and message.error():
                    raise AssertionError(message.error())
            assert message is not None, "no message consumed within 60 s"
            assert (message.key(), message.value()) == (b"order-1", b'{"amount_cents":42}')
            assert message.headers() == [("ce_type", b"shop.order.placed.v1")]
            consumer.commit(message, asynchronous=False)
        finally:
            consumer.close()
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)
