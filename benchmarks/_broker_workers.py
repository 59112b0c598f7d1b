"""The broker benchmark's processes. Each reports JSON lines on stdout:
``{"ready": true, ...}`` once it can start, then one result object (or
``{"error": "..."}`` when its part failed).

    python -m benchmarks._broker_workers ROLE CLIENT BROKER URL NAME [options]

ROLE is ``producer`` / ``consumer`` (throughput: ``--events`` events) or
``latency-producer`` / ``latency-consumer`` (``--rate`` events per second for
``--duration`` seconds). CLIENT is ``nervus`` (the transport ``from_url(URL)``
opens), ``raw`` (the broker's own Python client used the straightforward way) or
``faststream``. NAME is the fresh topic, stream, queue or schema of this run.
Every wait is bounded by ``--deadline`` seconds.

The clients send the same events: ``benchmarks._event.make_event`` encoded as
JSON. nervus wraps each in a CloudEvents envelope (a fresh id and time per
event). The raw clients do the same work the straightforward way: per event a
dict of the same CloudEvents headers with ``str(uuid.uuid4())`` as its id and
``datetime.now(UTC).isoformat()`` as its time, sent as the broker's own
headers (a JSON field on Redis, a column on PostgreSQL); their consumers read
each message's headers, take its type from ``ce_type`` and decode the body into
that type's class. FastStream sends a pydantic model with its own JSON. Every
consumer counts distinct order ids, so a duplicate delivery does not end a run
early.
"""

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

from benchmarks._event import SOURCE, OrderPlaced, from_delivery, make_event, to_message
from benchmarks._workers import wait_for_go
from nervus.transports import Transport, from_url

CONSUMER = "bench-consumer-1"


def group_of(name: str) -> str:
    """The consumer group of a run: named after its channel, so cleaning up finds it."""
    return f"{name}-group"


REPORTS = sys.stdout
"""Where the JSON lines go; ``main`` moves everything else written to stdout (the
libraries' log lines) to stderr, so they cannot be taken for a report."""


def report(**fields: Any) -> None:
    fields.setdefault("cpu_s", time.process_time())
    REPORTS.write(json.dumps(fields) + "\n")
    REPORTS.flush()


class Deadline:
    """A point in time every wait of a process is bounded by."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, doing: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"gave up after {self.seconds:g} s while {doing}")


class Tally:
    """What a consumer saw: distinct events, duplicates, first and last times, delays."""

    def __init__(self, latency: bool) -> None:
        self.seen: set[str] = set()
        self.received = 0
        self.first: float | None = None
        self.last = 0.0
        self.latency = latency
        self.delays: list[float] = []

    def add(self, event: OrderPlaced) -> None:
        now = time.time()
        if self.first is None:
            self.first = now
        self.received += 1
        self.seen.add(event.order_id)
        if self.latency:
            self.delays.append(now - event.sent_at)

    def result(self) -> dict[str, Any]:
        return {
            "first_delivery": self.first,
            "last_ack": self.last,
            "received": self.received,
            "distinct": len(self.seen),
            "duplicates": self.received - len(self.seen),
            "delays": self.delays,
        }


# -- the raw clients' events -------------------------------------------------------------
# What a user of the client writes to send typed events as CloudEvents in binary
# content mode, without a framework: the same headers nervus sends, a fresh id and
# time per event; at the consumer, the type from ``ce_type`` picks the class.

RawMessage = tuple[str, dict[str, str], bytes]
"""Partition key, headers, body."""

encode_json = msgspec.json.Encoder().encode
RAW_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    OrderPlaced.__message_type__: msgspec.json.Decoder(OrderPlaced)
}
"""The raw consumers' classes by event type: one decoder each."""
headers_decoder = msgspec.json.Decoder(dict[str, str])


def raw_message(n: int) -> RawMessage:
    """The raw clients' message: the event's key, its CloudEvents headers, its JSON."""
    event = make_event(n)
    key = event.order_id
    event_id = str(uuid.uuid4())
    headers = {
        "ce_specversion": "1.0",
        "ce_id": event_id,
        "ce_type": OrderPlaced.__message_type__,
        "ce_source": SOURCE,
        "ce_time": datetime.now(UTC).isoformat(),
        "content-type": "application/json",
        "ce_correlationid": event_id,
        "ce_partitionkey": key,
    }
    return key, headers, encode_json(event)


def raw_decode(event_type: str, body: bytes) -> Any:
    """The raw consumers' decoding: the class of ``ce_type`` (one dict lookup), then JSON."""
    return RAW_DECODERS[event_type].decode(body)


# -- raw clients -------------------------------------------------------------------------


class RawProducer(ABC):
    """One broker client publishing the straightforward way."""

    def __init__(self, url: str, name: str, partitions: int) -> None:
        self.url = url
        self.name = name
        self.partitions = partitions

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def send(self, messages: list[RawMessage]) -> None:
        """Publish; accepted by the broker on return unless ``finish`` has to wait."""

    async def finish(self, deadline: Deadline) -> None:
        """Wait until everything sent is accepted (most clients have by ``send``'s return)."""
        deadline.check("waiting for the last publish")

    @abstractmethod
    async def close(self) -> None: ...


class RawConsumer(ABC):
    """One broker client consuming the straightforward way. ``open`` creates the
    topic, stream, queue or table and the group; ``take`` returns each message's
    event type (its ``ce_type`` header) and body; ``settle`` acknowledges or
    commits what the last ``take`` returned."""

    def __init__(self, url: str, name: str, partitions: int, prefetch: int) -> None:
        self.url = url
        self.name = name
        self.partitions = partitions
        self.prefetch = prefetch

    @abstractmethod
    async def open(self, deadline: Deadline) -> None: ...

    @abstractmethod
    async def take(self, limit: int, timeout: float) -> list[tuple[str, bytes]]: ...

    @abstractmethod
    async def settle(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...


def kafka_servers(url: str) -> str:
    return urlsplit(url).netloc


def create_kafka_topic(servers: str, topic: str, partitions: int, timeout: float) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": servers})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1)],
        request_timeout=timeout,
    )
    for future in futures.values():
        future.result(timeout)


class KafkaRawProducer(RawProducer):
    """confluent-kafka ``Producer`` with its defaults (acks=all): ``produce`` with a
    delivery callback per message, ``poll(0)`` to serve callbacks, ``flush`` at the end."""

    async def open(self) -> None:
        from confluent_kafka import Producer

        self.producer = Producer({"bootstrap.servers": kafka_servers(self.url)})
        self.errors: list[str] = []
        self.delivered = 0

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self.errors.append(str(error))
        else:
            self.delivered += 1

    async def send(self, messages: list[RawMessage]) -> None:
        producer = self.producer
        for key, headers, body in messages:
            while True:
                try:
                    producer.produce(
                        self.name, body, key, headers=headers, on_delivery=self._delivered
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.poll(0)

    async def finish(self, deadline: Deadline) -> None:
        left = self.producer.flush(max(deadline.left(), 0.0))
        if left:
            raise TimeoutError(f"{left} messages still unacknowledged by Kafka at the deadline")
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} deliveries failed, first: {self.errors[0]}")

    async def close(self) -> None:
        self.producer.flush(5)


class KafkaRawConsumer(RawConsumer):
    """confluent-kafka ``Consumer`` without auto-commit: ``poll`` for the first message,
    ``consume`` what else is fetched, each message's headers as a dict, then ``commit``
    the batch synchronously."""

    async def open(self, deadline: Deadline) -> None:
        from confluent_kafka import Consumer

        servers = kafka_servers(self.url)
        create_kafka_topic(servers, self.name, self.partitions, deadline.left())
        self.consumer = Consumer(
            {
                "bootstrap.servers": servers,
                "group.id": group_of(self.name),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self.consumer.subscribe([self.name])
        self.pending: list[tuple[str, bytes]] = []
        while not self.consumer.assignment():
            deadline.check("waiting for the Kafka group to assign partitions")
            self.pending.extend(await self.take(self.prefetch, 0.1))

    async def take(self, limit: int, timeout: float) -> list[tuple[str, bytes]]:
        if self.pending:
            taken, self.pending = self.pending[:limit], self.pending[limit:]
            return taken
        # ``consume(n, timeout)`` waits for n messages or the timeout: wait for the
        # first with ``poll``, then take what is already fetched without waiting.
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        bodies: list[tuple[str, bytes]] = []
        for message in [first, *self.consumer.consume(limit - 1, 0)]:
            error = message.error()
            if error is None:
                headers = dict(message.headers() or ())
                bodies.append((headers["ce_type"].decode(), message.value() or b""))
            elif error.fatal():
                raise RuntimeError(f"Kafka consumer error: {error}")
            # Other errors are the client's news (a topic not yet known to every
            # broker, a broker that went away); it recovers by itself.
        self.last_batch = len(bodies)
        return bodies

    async def settle(self) -> None:
        if self.last_batch:
            self.consumer.commit(asynchronous=False)
            self.last_batch = 0

    async def close(self) -> None:
        self.consumer.close()

    last_batch = 0


class NatsRawProducer(RawProducer):
    """nats-py JetStream: ``js.publish`` (waits for the stream's ack) for each message,
    the calls of one batch awaited together."""

    async def open(self) -> None:
        import nats

        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()

    async def send(self, messages: list[RawMessage]) -> None:
        await asyncio.gather(
            *(self.js.publish(self.name, body, headers=headers) for _, headers, body in messages)
        )

    async def close(self) -> None:
        await self.nc.close()


class NatsRawConsumer(RawConsumer):
    """nats-py JetStream pull subscription: ``fetch`` a batch, ``msg.ack()`` each."""

    async def open(self, deadline: Deadline) -> None:
        import nats

        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        await self.js.add_stream(name=self.name, subjects=[self.name])
        self.sub = await self.js.pull_subscribe(
            self.name, durable=group_of(self.name), stream=self.name
        )
        self.taken: list[Any] = []

    async def take(self, limit: int, timeout: float) -> list[tuple[str, bytes]]:
        import nats.errors

        try:
            self.taken = await self.sub.fetch(limit, timeout=timeout)
        except nats.errors.TimeoutError:
            self.taken = []
        return [(m.headers["ce_type"], m.data) for m in self.taken]

    async def settle(self) -> None:
        for message in self.taken:
            await message.ack()
        self.taken = []

    async def close(self) -> None:
        await self.nc.close()


class RedisRawProducer(RawProducer):
    """redis-py (asyncio) Streams: one ``XADD`` per message in a pipeline per batch.
    Concurrent calls wait for a free connection (a blocking pool) instead of failing."""

    async def open(self) -> None:
        import redis.asyncio

        pool = redis.asyncio.BlockingConnectionPool.from_url(self.url, timeout=30)
        self.redis = redis.asyncio.Redis(connection_pool=pool)

    async def send(self, messages: list[RawMessage]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for key, headers, body in messages:
            pipe.xadd(self.name, {"key": key, "headers": encode_json(headers), "body": body})
        await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()


class RedisRawConsumer(RawConsumer):
    """redis-py (asyncio) Streams: ``XREADGROUP`` a batch, each entry's headers
    decoded from JSON, one ``XACK`` for its ids."""

    async def open(self, deadline: Deadline) -> None:
        import redis.asyncio

        self.redis = redis.asyncio.Redis.from_url(self.url)
        await self.redis.xgroup_create(self.name, group_of(self.name), id="0", mkstream=True)
        self.ids: list[bytes] = []

    async def take(self, limit: int, timeout: float) -> list[tuple[str, bytes]]:
        reply = await self.redis.xreadgroup(
            group_of(self.name),
            CONSUMER,
            {self.name: ">"},
            count=limit,
            block=max(1, int(timeout * 1000)),
        )
        if not reply:
            return []
        entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1]  # type: ignore[index, assignment]
        self.ids = [entry_id for entry_id, _ in entries]
        return [
            (headers_decoder.decode(fields[b"headers"])["ce_type"], fields[b"body"])
            for _, fields in entries
        ]

    async def settle(self) -> None:
        if self.ids:
            await self.redis.xack(self.name, group_of(self.name), *self.ids)
            self.ids = []

    async def close(self) -> None:
        await self.redis.aclose()


class RabbitRawProducer(RawProducer):
    """aio-pika with publisher confirms (the channel default): a persistent message
    per event to a durable queue, the publishes of one batch awaited together."""

    async def open(self) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()
        self.message_type = aio_pika.Message
        self.persistent = aio_pika.DeliveryMode.PERSISTENT

    async def send(self, messages: list[RawMessage]) -> None:
        exchange = self.channel.default_exchange
        await asyncio.gather(
            *(
                exchange.publish(
                    self.message_type(body, headers=headers, delivery_mode=self.persistent),
                    routing_key=self.name,
                )
                for _, headers, body in messages
            )
        )

    async def close(self) -> None:
        await self.connection.close()


class RabbitRawConsumer(RawConsumer):
    """aio-pika consumer on a durable queue with a prefetch; ``ack`` per message."""

    async def open(self, deadline: Deadline) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()
        await self.channel.set_qos(prefetch_count=self.prefetch)
        queue = await self.channel.declare_queue(self.name, durable=True)
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.taken: list[Any] = []
        await queue.consume(self.inbox.put)

    async def take(self, limit: int, timeout: float) -> list[tuple[str, bytes]]:
        try:
            first = await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return []
        self.taken = [first]
        while len(self.taken) < limit and not self.inbox.empty():
            self.taken.append(self.inbox.get_nowait())
        return [(m.headers["ce_type"], m.body) for m in self.taken]

    async def settle(self) -> None:
        for message in self.taken:
            await message.ack()
        self.taken = []

    async def close(self) -> None:
        await self.connection.close()


class PostgresRawProducer(RawProducer):
    """psycopg (asyncio): one multi-row ``INSERT`` per batch into a log table."""

    async def open(self) -> None:
        import psycopg

        self.conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        self.statements: dict[int, str] = {}

    def _statement(self, rows: int) -> str:
        statement = self.statements.get(rows)
        if statement is None:
            values = ", ".join(["(%s, %s, %s)"] * rows)
            statement = f"INSERT INTO {self.name}.log (key, headers, body) VALUES {values}"
            self.statements[rows] = statement
        return statement

    async def send(self, messages: list[RawMessage]) -> None:
        params: list[Any] = []
        for key, headers, body in messages:
            params += (key, encode_json(headers), body)
        await self.conn.execute(self._statement(len(messages)), params)

    async def close(self) -> None:
        await self.conn.close()


class PostgresRawConsumer(RawConsumer):
    """psycopg (asyncio): ``SELECT ... WHERE id > last ORDER BY id LIMIT n``, each row's
    headers decoded from JSON, then one ``UPDATE`` of the group's offset per batch.
    Polls every 2 ms when idle."""

    async def open(self, deadline: Deadline) -> None:
        import psycopg

        self.conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        schema = self.name
        for statement in (
            f"CREATE SCHEMA {schema}",
            f"CREATE TABLE {schema}.log (id bigserial PRIMARY KEY, key text, "
            "headers bytea NOT NULL, body bytea NOT NULL)",
            f"CREATE TABLE {schema}.offsets (grp text PRIMARY KEY, position bigint NOT NULL)",
        ):
            await self.conn.execute(statement)
        await self.conn.execute(
            f"INSERT INTO {schema}.offsets VALUES (%s, 0)",
            (group_of(self.name),),
        )
        self.position = 0
        self.taken_up_to = 0

    async def take(self, limit: int, timeout: float) -> list[tuple[str, bytes]]:
        until = time.monotonic() + timeout
        while True:
            cursor = await self.conn.execute(
                f"SELECT id, headers, body FROM {self.name}.log WHERE id > %s ORDER BY id LIMIT %s",
                (self.position, limit),
            )
            rows = await cursor.fetchall()
            if rows:
                self.taken_up_to = rows[-1][0]
                return [(headers_decoder.decode(row[1])["ce_type"], row[2]) for row in rows]
            if time.monotonic() >= until:
                return []
            await asyncio.sleep(0.002)

    async def settle(self) -> None:
        if self.taken_up_to > self.position:
            self.position = self.taken_up_to
            await self.conn.execute(
                f"UPDATE {self.name}.offsets SET position = %s WHERE grp = %s",
                (self.position, group_of(self.name)),
            )

    async def close(self) -> None:
        await self.conn.close()


RAW_PRODUCERS: dict[str, type[RawProducer]] = {
    "kafka": KafkaRawProducer,
    "nats": NatsRawProducer,
    "redis": RedisRawProducer,
    "rabbitmq": RabbitRawProducer,
    "postgres": PostgresRawProducer,
}
RAW_CONSUMERS: dict[str, type[RawConsumer]] = {
    "kafka": KafkaRawConsumer,
    "nats": NatsRawConsumer,
    "redis": RedisRawConsumer,
    "rabbitmq": RabbitRawConsumer,
    "postgres": PostgresRawConsumer,
}


# -- producers ---------------------------------------------------------------------------


async def publish_paced(
    publish: Callable[[int], Awaitable[None]], rate: float, duration: float, deadline: Deadline
) -> list[float]:
    """Call ``publish(n)`` ``rate`` times a second for ``duration`` s, each call in its
    own task, as concurrent handlers would make them; return each call's duration."""
    total = int(rate * duration)
    start = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()
    took: list[float] = []
    failures: list[Exception] = []

    async def timed(n: int) -> None:
        began = time.perf_counter()
        try:
            await publish(n)
        except Exception as exc:  # a task's error is otherwise lost with the task
            failures.append(exc)
            return
        took.append(time.perf_counter() - began)

    for n in range(total):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(timed(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait_for(asyncio.gather(*list(tasks)), max(deadline.left(), 0.001))
    if failures:
        first = failures[0]
        raise RuntimeError(
            f"{len(failures)} of {total} publish calls failed; the first: "
            f"{type(first).__name__}: {first}"
        )
    return took


async def nervus_producer(args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    transport = from_url(args.url)
    await asyncio.wait_for(transport.connect(), deadline.left())
    try:
        await asyncio.wait_for(
            transport.ensure_channel(args.name, args.partitions), deadline.left()
        )
        report(ready=True)
        await asyncio.get_running_loop().run_in_executor(None, wait_for_go)
        if args.role == "latency-producer":

            async def publish_one(n: int) -> None:
                await transport.publish(args.name, [to_message(make_event(n))])

            took = await publish_paced(publish_one, args.rate, args.duration, deadline)
            return {"events": len(took), "publish_s": took}
        started = time.time()
        pending: set[asyncio.Task[None]] = set()
        for first in range(0, args.events, args.batch):
            last = min(first + args.batch, args.events)
            messages = [to_message(make_event(n)) for n in range(first, last)]
            if len(pending) >= args.in_flight:
                done, pending = await asyncio.wait(
                    pending, timeout=deadline.left(), return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    task.result()
                deadline.check("publishing")
            pending.add(asyncio.create_task(transport.publish(args.name, messages)))
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), max(deadline.left(), 0.001))
        return {"first_publish": started, "last_publish": time.time(), "events": args.events}
    finally:
        await asyncio.wait_for(transport.close(), 10)


async def raw_producer(args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    producer = RAW_PRODUCERS[args.broker](args.url, args.name, args.partitions)
    await asyncio.wait_for(producer.open(), deadline.left())
    try:
        report(ready=True)
        await asyncio.get_running_loop().run_in_executor(None, wait_for_go)
        if args.role == "latency-producer":

            async def publish_one(n: int) -> None:
                await producer.send([raw_message(n)])

            took = await publish_paced(publish_one, args.rate, args.duration, deadline)
            await producer.finish(deadline)
            return {"events": len(took), "publish_s": took}
        started = time.time()
        for first in range(0, args.events, args.batch):
            last = min(first + args.batch, args.events)
            await asyncio.wait_for(
                producer.send([raw_message(n) for n in range(first, last)]),
                max(deadline.left(), 0.001),
            )
        await producer.finish(deadline)
        return {"first_publish": started, "last_publish": time.time(), "events": args.events}
    finally:
        await asyncio.wait_for(producer.close(), 10)


# -- consumers ---------------------------------------------------------------------------


async def nervus_consumer(args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    latency = args.role == "latency-consumer"
    wanted = int(args.rate * args.duration) if latency else args.events
    tally = Tally(latency)
    transport: Transport = from_url(args.url)
    await asyncio.wait_for(transport.connect(), deadline.left())
    try:
        await asyncio.wait_for(
            transport.ensure_channel(args.name, args.partitions), deadline.left()
        )
        subscription = await asyncio.wait_for(
            transport.subscribe([args.name], group_of(args.name), max_in_flight=args.fetch),
            deadline.left(),
        )

        async def drain(timeout: float) -> None:
            batch = await subscription.fetch(args.fetch, timeout)
            for delivery in batch:
                tally.add(from_delivery(delivery.headers, delivery.body))
            if batch:
                await subscription.ack(batch)

        # Joining a group may take a moment (a rebalance); the run starts after it.
        while not subscription.assignment():
            deadline.check("waiting for the group to assign partitions")
            await drain(0.1)
        report(ready=True, partitions=len(subscription.assignment()))
        while len(tally.seen) < wanted:
            deadline.check(f"consuming ({len(tally.seen)} of {wanted} events received)")
            await drain(min(1.0, max(deadline.left(), 0.001)))
        tally.last = time.time()
        await asyncio.wait_for(subscription.close(), 10)
    finally:
        await asyncio.wait_for(transport.close(), 10)
    return tally.result()


async def raw_consumer(args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    latency = args.role == "latency-consumer"
    wanted = int(args.rate * args.duration) if latency else args.events
    tally = Tally(latency)
    consumer = RAW_CONSUMERS[args.broker](args.url, args.name, args.partitions, args.fetch)
    await asyncio.wait_for(consumer.open(deadline), deadline.left())
    try:
        report(ready=True)
        while len(tally.seen) < wanted:
            deadline.check(f"consuming ({len(tally.seen)} of {wanted} events received)")
            taken = await consumer.take(args.fetch, min(1.0, max(deadline.left(), 0.001)))
            for event_type, body in taken:
                tally.add(raw_decode(event_type, body))
            await consumer.settle()
        tally.last = time.time()
    finally:
        await asyncio.wait_for(consumer.close(), 10)
    return tally.result()


# -- FastStream --------------------------------------------------------------------------
# FastStream with its defaults: a pydantic model per event, ``publisher.publish`` per
# event awaited one after the other, a subscriber whose handler FastStream calls with
# the decoded model. Only what a run needs is set: names, the consumer group, reading
# from the earliest offset on Kafka (the group joins before anything is published).


def faststream_model() -> type[Any]:
    import pydantic

    class OrderPlacedModel(pydantic.BaseModel):
        order_id: str
        customer_id: str
        sku: str
        quantity: int
        amount_cents: int
        currency: str
        sent_at: float
        note: str

    return OrderPlacedModel


def faststream_broker(broker: str, url: str, logging: bool) -> Any:
    """FastStream's broker; ``logging=False`` turns off its log line per message."""
    options: dict[str, Any] = {} if logging else {"logger": None}
    if broker == "kafka":
        from faststream.kafka import KafkaBroker

        return KafkaBroker(kafka_servers(url), **options)
    if broker == "nats":
        from faststream.nats import NatsBroker

        return NatsBroker(url, **options)
    if broker == "redis":
        from faststream.redis import RedisBroker

        return RedisBroker(url, **options)
    if broker == "rabbitmq":
        from faststream.rabbit import RabbitBroker

        return RabbitBroker(url, **options)
    raise ValueError(f"FastStream has no broker for {broker!r}")


async def faststream_producer(args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    model = faststream_model()
    broker = faststream_broker(args.broker, args.url, args.faststream_logging)
    if args.broker == "kafka":
        publisher = broker.publisher(args.name)
    elif args.broker == "nats":
        publisher = broker.publisher(args.name, stream=args.name)
    elif args.broker == "redis":
        publisher = broker.publisher(stream=args.name)
    else:
        publisher = broker.publisher(queue=args.name)
    await asyncio.wait_for(broker.start(), deadline.left())
    try:
        report(ready=True)
        await asyncio.get_running_loop().run_in_executor(None, wait_for_go)
        started = time.time()
        for n in range(args.events):
            if n % 1000 == 0:
                deadline.check(f"publishing ({n} of {args.events} events published)")
            await publisher.publish(model(**msgspec.structs.asdict(make_event(n))))
        return {"first_publish": started, "last_publish": time.time(), "events": args.events}
    finally:
        await asyncio.wait_for(broker.stop(), 10)


async def faststream_consumer(args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    model = faststream_model()
    broker = faststream_broker(args.broker, args.url, args.faststream_logging)
    tally = Tally(latency=False)
    done = asyncio.Event()
    if args.broker == "kafka":
        create_kafka_topic(kafka_servers(args.url), args.name, args.partitions, deadline.left())
        subscriber = broker.subscriber(
            args.name, group_id=group_of(args.name), auto_offset_reset="earliest"
        )
    elif args.broker == "nats":
        from faststream.nats import JStream

        subscriber = broker.subscriber(
            args.name, stream=JStream(args.name), durable=group_of(args.name)
        )
    elif args.broker == "redis":
        from faststream.redis import StreamSub

        subscriber = broker.subscriber(
            stream=StreamSub(args.name, group=group_of(args.name), consumer=CONSUMER, last_id="0")
        )
    else:
        from faststream.rabbit import RabbitQueue

        subscriber = broker.subscriber(RabbitQueue(args.name, durable=True))

    async def handle(event: model) -> None:  # type: ignore[valid-type]
        tally.add(event)
        if len(tally.seen) >= args.events:
            tally.last = time.time()
            done.set()

    subscriber(handle)
    await asyncio.wait_for(broker.start(), deadline.left())
    try:
        if args.broker == "kafka":
            while not subscriber.consumer or not subscriber.consumer.assignment():
                deadline.check("waiting for the Kafka group to assign partitions")
                await asyncio.sleep(0.05)
        report(ready=True)
        try:
            await asyncio.wait_for(done.wait(), max(deadline.left(), 0.001))
        except TimeoutError:
            deadline.check(f"consuming ({len(tally.seen)} of {args.events} events received)")
    finally:
        await asyncio.wait_for(broker.stop(), 10)
    return tally.result()


# -- entry point -------------------------------------------------------------------------

ROLES: dict[tuple[str, str], Callable[[argparse.Namespace, Deadline], Awaitable[dict[str, Any]]]]
ROLES = {
    ("producer", "nervus"): nervus_producer,
    ("consumer", "nervus"): nervus_consumer,
    ("latency-producer", "nervus"): nervus_producer,
    ("latency-consumer", "nervus"): nervus_consumer,
    ("producer", "raw"): raw_producer,
    ("consumer", "raw"): raw_consumer,
    ("latency-producer", "raw"): raw_producer,
    ("latency-consumer", "raw"): raw_consumer,
    ("producer", "faststream"): faststream_producer,
    ("consumer", "faststream"): faststream_consumer,
}


async def run(args: argparse.Namespace) -> None:
    deadline = Deadline(args.deadline)
    role = ROLES.get((args.role, args.client))
    if role is None:
        report(error=f"no {args.role} for client {args.client!r}")
        return
    try:
        result = await role(args, deadline)
    except Exception as exc:
        detail = str(exc) or repr(exc)
        report(error=f"{type(exc).__name__}: {detail}")
        return
    report(**result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._broker_workers")
    parser.add_argument(
        "role", choices=["producer", "consumer", "latency-producer", "latency-consumer"]
    )
    parser.add_argument("client", choices=["nervus", "raw", "faststream"])
    parser.add_argument("broker", choices=sorted(RAW_PRODUCERS))
    parser.add_argument("url", help="nervus transport URL or the raw client's server URL")
    parser.add_argument("name", help="the fresh channel, topic, stream, queue or schema")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--fetch", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument(
        "--faststream-logging",
        type=lambda text: text == "on",
        default=True,
        help="on (FastStream's default: a log line per message) or off",
    )
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds for everything")
    args = parser.parse_args(argv)
    global REPORTS
    REPORTS = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
