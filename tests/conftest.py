"""Reaching the real servers that integration tests run against.

Every server has a URL taken from an environment variable, with the loopback
address that ``scripts/services up`` starts as the default:

==========  ==================================  ===================================================
server      variable                            default
==========  ==================================  ===================================================
postgres    ``NERVUS_TEST_POSTGRES_URL``        ``postgresql://nervus:nervus@127.0.0.1:5432/nervus``
redis       ``NERVUS_TEST_REDIS_URL``           ``redis://127.0.0.1:6379/0``
nats        ``NERVUS_TEST_NATS_URL``            ``nats://127.0.0.1:4222``
rabbitmq    ``NERVUS_TEST_RABBITMQ_URL``        ``amqp://guest:guest@127.0.0.1:5672/``
rabbitmq    ``NERVUS_TEST_RABBITMQ_STREAM_URL`` ``rabbitmq-stream://guest:guest@127.0.0.1:5552/``
kafka       ``NERVUS_TEST_KAFKA_URL``           ``kafka://127.0.0.1:9092``
==========  ==================================  ===================================================

A test asks for a server by requesting its fixture, which returns the URL::

    @pytest.mark.integration
    @pytest.mark.kafka
    def test_something(kafka_bootstrap_servers: str) -> None:
        producer = Producer({"bootstrap.servers": kafka_bootstrap_servers})

Before returning, the fixture opens a TCP connection to the server. When
nothing answers, the test is skipped with a reason naming the server and its
URL, or fails instead when ``NERVUS_REQUIRE_SERVICES=1`` (as in CI, where a
silently skipped backend would hide a broken one). Code outside a fixture can
call :func:`require_service` or :func:`require_url` directly.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REQUIRE_ENV = "NERVUS_REQUIRE_SERVICES"

#: Environment variable and default URL of each server, by name.
SERVICE_URLS: dict[str, tuple[str, str]] = {
    "postgres": ("NERVUS_TEST_POSTGRES_URL", "postgresql://nervus:nervus@127.0.0.1:5432/nervus"),
    "redis": ("NERVUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "nats": ("NERVUS_TEST_NATS_URL", "nats://127.0.0.1:4222"),
    "rabbitmq": ("NERVUS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    "rabbitmq-stream": (
        "NERVUS_TEST_RABBITMQ_STREAM_URL",
        "rabbitmq-stream://guest:guest@127.0.0.1:5552/",
    ),
    "kafka": ("NERVUS_TEST_KAFKA_URL", "kafka://127.0.0.1:9092"),
}

#: Port used when a URL names none, by scheme.
DEFAULT_PORTS: dict[str, int] = {
    "postgresql": 5432,
    "postgres": 5432,
    "redis": 6379,
    "rediss": 6379,
    "nats": 4222,
    "tls": 4222,
    "amqp": 5672,
    "amqps": 5671,
    "rabbitmq-stream": 5552,
    "kafka": 9092,
}

CONNECT_TIMEOUT = 1.0


def service_url(name: str) -> str:
    """The URL of server ``name``: its environment variable, else the loopback default."""
    variable, default = SERVICE_URLS[name]
    return os.environ.get(variable) or default


def service_addresses(url: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` pairs a URL names, in order.

    Accepts several comma-separated hosts (``kafka://a:9092,b:9092``) and a bare
    ``host:port`` list, as Kafka bootstrap strings are often written.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "kafka", url
    netloc = rest.split("/", 1)[0].rpartition("@")[2]
    default_port = DEFAULT_PORTS.get(scheme.lower(), 0)
    addresses = []
    for part in filter(None, netloc.split(",")):
        parsed = urlsplit(f"//{part}")
        addresses.append((parsed.hostname or "127.0.0.1", parsed.port or default_port))
    return addresses or [("127.0.0.1", default_port)]


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``, for messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.partition("@")
    if not (sep and at and ":" in userinfo):
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"


def kafka_bootstrap(url: str) -> str:
    """``kafka://a:9092,b:9092`` as the ``bootstrap.servers`` string ``a:9092,b:9092``."""
    return ",".join(f"{host}:{port}" for host, port in service_addresses(url))


def require_service(
    name: str, host: str, port: int, *, url: str | None = None, timeout: float = CONNECT_TIMEOUT
) -> None:
    """Skip the running test, or fail it under ``NERVUS_REQUIRE_SERVICES=1``,
    unless something accepts a TCP connection on ``host:port``.

    ``name`` and ``url`` only shape the message, so a reader knows which server
    to start (``scripts/services up``) or which variable to set.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        where = redact(url) if url else f"{host}:{port}"
        reason = f"{name} is not reachable at {where} ({exc})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 requires it", pytrace=False)
    pytest.skip(f"{reason}; start it with scripts/services up")


def require_url(name: str, url: str) -> str:
    """:func:`require_service` on the first address of ``url``; returns ``url``."""
    host, port = service_addresses(url)[0]
    require_service(name, host, port, url=url)
    return url


@pytest.fixture
def postgres_url() -> str:
    """URL of a reachable PostgreSQL server (database usable by the tests)."""
    return require_url("postgres", service_url("postgres"))


@pytest.fixture
def redis_url() -> str:
    """URL of a reachable Redis server."""
    return require_url("redis", service_url("redis"))


@pytest.fixture
def nats_url() -> str:
    """URL of a reachable NATS server with JetStream enabled."""
    return require_url("nats", service_url("nats"))


@pytest.fixture
def rabbitmq_url() -> str:
    """AMQP 0-9-1 URL of a reachable RabbitMQ broker."""
    return require_url("rabbitmq", service_url("rabbitmq"))


@pytest.fixture
def rabbitmq_stream_url() -> str:
    """Stream-protocol URL of a reachable RabbitMQ broker (``rabbitmq_stream`` plugin)."""
    return require_url("rabbitmq-stream", service_url("rabbitmq-stream"))


@pytest.fixture
def kafka_url() -> str:
    """URL of a reachable Kafka cluster; see :func:`kafka_bootstrap`."""
    return require_url("kafka", service_url("kafka"))


@pytest.fixture
def kafka_bootstrap_servers(kafka_url: str) -> str:
    """``bootstrap.servers`` of a reachable Kafka cluster, e.g. ``127.0.0.1:9092``."""
    return kafka_bootstrap(kafka_url)


@asynccontextmanager
async def postgres_schema(postgres_url: str, prefix: str = "nervus_test") -> AsyncIterator[str]:
    """A store URL on a schema of its own on ``postgres_url``, dropped afterwards."""
    import asyncpg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in postgres_url else "?"
    yield f"{postgres_url}{separator}schema={schema}&poll_interval=0.2"
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture(
    params=[
        pytest.param("sqlite"),
        pytest.param("postgres", marks=[pytest.mark.integration, pytest.mark.postgres]),
    ]
)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty event store: a SQLite file, then a fresh schema on PostgreSQL (skipped,
    or failed under NERVUS_REQUIRE_SERVICES=1, when the server is not reachable)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
        return
    async with postgres_schema(request.getfixturevalue("postgres_url")) as url:
        yield url
