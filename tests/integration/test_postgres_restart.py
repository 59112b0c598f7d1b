"""The PostgreSQL transport rides out its server going away and coming back.

Each test stops the local server (``scripts/services down postgres``) while a
transport is connected, checks what publishers and consumers see meanwhile, starts
it again and checks that the same transport and subscription carry on: publishing
works, new messages arrive, and nothing acknowledged before the outage comes back.
The server is started again whatever happens, so later tests find it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from nervus import Context, Event, Service, Settings
from nervus.errors import TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Subscription, from_url
from nervus.transports.postgres import PostgresTransport

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]

SERVICES = Path(__file__).resolve().parents[2] / "scripts" / "services"
LOCAL_SERVER = "postgresql://nervus:nervus@127.0.0.1:5432/nervus"
REDACTED = "postgresql://nervus:***@127.0.0.1:5432/nervus"
LOGGER = "nervus.transports.postgres"
OPTIONS = (
    "partitions=2&lease_seconds=2&heartbeat_seconds=0.25&commit_interval=0.01"
    "&poll_interval=0.5&connect_timeout=5"
)


class Pinged(Event, type="test.restart.pinged.v1", channel="pings", key="key"):
    key: str
    n: int


async def run_services(action: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(SERVICES),
        action,
        "postgres",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(120):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"scripts/services {action} postgres failed:\n{out.decode()}"


@contextlib.asynccontextmanager
async def server_stopped() -> AsyncIterator[None]:
    """The PostgreSQL server is down inside the block, and up again after it,
    also when the block fails."""
    try:
        await run_services("down")
        yield
    finally:
        await run_services("up")


@pytest.fixture
async def schema_url(postgres_url: str) -> AsyncIterator[str]:
    """The URL of a schema used by this test alone, dropped at the end."""
    if postgres_url != LOCAL_SERVER:
        pytest.skip(f"restarts only the server scripts/services runs at {REDACTED}")
    schema = f"nervus_test_{uuid.uuid4().hex[:12]}"
    yield f"{postgres_url}?schema={schema}&{OPTIONS}"
    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        await conn.execute("SET lock_timeout = '10s'")
        await conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
        )


def msgs(numbers: range) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(key=f"k{n % 3}", headers={"n": str(n)}, body=b"%d" % n) for n in numbers
    ]


def numbers(deliveries: list[Delivery]) -> list[int]:
    return [int(d.headers["n"]) for d in deliveries]


async def receive(sub: Subscription, wanted: set[int], within: float = 20.0) -> list[Delivery]:
    """Fetch and ack until every number in ``wanted`` came, retrying a fetch that
    finds the server unreachable (as the runtime does)."""
    got: list[Delivery] = []
    async with asyncio.timeout(within):
        while not wanted <= set(numbers(got)):
            try:
                batch = await sub.fetch(100, 0.2)
            except TransportUnavailable:
                await asyncio.sleep(0.1)
                continue
            got.extend(batch)
            if batch:
                await sub.ack(batch)
    return got


async def committed(url: str, schema: str, group: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT coalesce(sum(committed), 0) FROM {}.offsets WHERE grp = %s").format(
                sql.Identifier(schema)
            ),
            (group,),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER
        and r.levelno >= logging.WARNING
        and " is unreachable " in r.getMessage()
    ]


async def test_publishers_and_consumers_resume_after_the_server_restarts(
    schema_url: str, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    schema = schema_url.partition("schema=")[2].partition("&")[0]
    transport = from_url(schema_url)
    assert isinstance(transport, PostgresTransport)
    await transport.connect()
    try:
        sub = await transport.subscribe(["c"], "g")
        first = range(0, 10)
        await transport.publish("c", msgs(first))
        assert set(numbers(await receive(sub, set(first)))) == set(first)
        async with asyncio.timeout(10):  # acknowledged means committed
            while await committed(postgres_url, schema, "g") < len(first):
                await asyncio.sleep(0.05)
        in_flight = range(10, 14)
        await transport.publish("c", msgs(in_flight))
        held: list[Delivery] = []
        async with asyncio.timeout(10):
            while len(held) < len(in_flight):
                held += await sub.fetch(len(in_flight) - len(held), 0.2)
        caplog.clear()

        async with server_stopped():
            for _ in range(2):
                with pytest.raises(TransportUnavailable) as failed:
                    async with asyncio.timeout(15):
                        await transport.publish("c", msgs(range(50, 51)))
                assert failed.value.retryable
                assert REDACTED in str(failed.value)
                assert "'c'" in str(failed.value)
            for _ in range(3):  # the runtime retries a retryable fetch error with backoff
                with pytest.raises(TransportUnavailable) as failed:
                    async with asyncio.timeout(15):
                        await sub.fetch(10, 0.2)
                assert failed.value.retryable
                assert REDACTED in str(failed.value)
                await asyncio.sleep(0.2)
            await sub.ack(held[:2])  # settled during the outage: committed once it is back
            await asyncio.sleep(0.5)  # commits and lease renewals fail meanwhile
            warnings = outage_warnings(caplog)
            assert len(warnings) == 1, warnings
            assert REDACTED in warnings[0]
            assert "nervus:nervus@" not in caplog.text

        await sub.ack(held[2:])
        second = range(100, 110)
        await transport.publish("c", msgs(second))
        after = numbers(await receive(sub, set(second)))
        # Anything acknowledged before the outage stays acknowledged; only what was
        # in flight at the outage may come again.
        assert set(after) <= set(second) | set(in_flight), after
        assert not set(after) & set(first)
        assert len(outage_warnings(caplog)) == 1
        assert any(
            "answers again" in r.getMessage() and REDACTED in r.getMessage()
            for r in caplog.records
            if r.name == LOGGER
        )
        await sub.close()
    finally:
        await transport.close()

    # What was settled after the outage was committed: a new member of the group
    # receives at most what was in flight at the outage, nothing of either batch.
    async with from_url(schema_url) as again:
        sub = await again.subscribe(["c"], "g")
        leftovers: list[Delivery] = []
        for _ in range(3):
            batch = await sub.fetch(100, 0.5)
            leftovers += batch
            await sub.ack(batch)
        assert set(numbers(leftovers)) <= set(in_flight), numbers(leftovers)


async def test_a_service_keeps_handling_through_a_server_restart(schema_url: str) -> None:
    handled: list[int] = []
    service = Service(
        "restart-check",
        settings=Settings(
            transport=schema_url,
            backoff_initial=0.05,
            backoff_max=0.5,
            backoff_jitter=0.0,
            publish_timeout=40.0,
            shutdown_timeout=5.0,
        ),
    )

    @service.on(Pinged)
    async def count(event: Pinged, ctx: Context) -> None:
        handled.append(event.n)

    async def wait_handled(expected: set[int]) -> None:
        async with asyncio.timeout(20):
            while not expected <= set(handled):
                await asyncio.sleep(0.05)

    async with service:
        for n in range(20):
            await service.publish(Pinged(key=f"k{n % 4}", n=n))
        await wait_handled(set(range(20)))

        publishing: asyncio.Task[None] | None = None
        try:
            async with server_stopped():
                # Published while the server is down: the service retries each publish
                # with backoff until the server is back.
                publishing = asyncio.create_task(
                    service.publish_many(Pinged(key=f"k{n % 4}", n=n) for n in range(20, 40))
                )
                await asyncio.sleep(1.0)
                assert not publishing.done()
            await asyncio.wait_for(publishing, 40)
        finally:
            if publishing is not None and not publishing.done():
                publishing.cancel()
                await asyncio.gather(publishing, return_exceptions=True)
        await wait_handled(set(range(40)))
        assert service.state == "running"
        async with asyncio.timeout(20):
            while not service.health().healthy:
                await asyncio.sleep(0.1)
