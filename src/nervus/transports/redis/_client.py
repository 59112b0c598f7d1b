"""The connection to Redis: opening it, the registered scripts, and turning client
errors into nervus errors."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nervus.errors import TransportError, TransportUnavailable
from nervus.transports.redis import _scripts
from nervus.transports.redis._settings import RedisSettings

# XAUTOCLAIM that also reports deleted entries, and scripts that read the time
XAUTOCLAIM_VERSION = (7, 0)
WAITAOF_VERSION = (7, 2)


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def failure(exc: BaseException, what: str, *, channel: str | None = None) -> TransportError:
    """The nervus error for a failed Redis call: unavailable when the connection
    failed or timed out (a retry can help), else a plain transport error."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError):
        return TransportUnavailable(f"{what}: Redis is unreachable ({exc})", channel=channel)
    return TransportError(f"{what}: Redis refused ({type(exc).__name__}: {exc})", channel=channel)


def version_of(text: str) -> tuple[int, int]:
    major, _, rest = text.partition(".")
    minor = rest.partition(".")[0]
    return (int(major), int(minor or 0))


class Connection:
    """A pooled client to one Redis server and the scripts registered on it."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.where = redact(settings.address)
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            settings.address,
            socket_connect_timeout=settings.connect_timeout,
            socket_timeout=settings.command_timeout,
            health_check_interval=30,
            # No silent retries: a read retried after its answer was lost would leave
            # entries pending that nobody saw; failures surface and are handled here.
            retry=Retry(NoBackoff(), 0),
        )
        self.renew: AsyncScript = self.client.register_script(_scripts.RENEW)
        self.leave: AsyncScript = self.client.register_script(_scripts.LEAVE)
        self.nack: AsyncScript = self.client.register_script(_scripts.NACK)
        self.replay: AsyncScript = self.client.register_script(_scripts.REPLAY)
        self.prune: AsyncScript = self.client.register_script(_scripts.PRUNE)
        self.version = (0, 0)
        self.aof_enabled = False

    async def open(self) -> None:
        """Check the server answers and can do what the settings ask, within
        ``connect_timeout``; raise ``TransportUnavailable`` naming the URL if not."""
        settings = self.settings
        try:
            async with asyncio.timeout(settings.connect_timeout):
                info: dict[str, Any] = await self.client.info("server")
                persistence: dict[str, Any] = await self.client.info("persistence")
        except (RedisError, OSError, TimeoutError) as exc:
            await self.close()
            detail = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                detail = f"no answer within connect_timeout={settings.connect_timeout}s"
            raise TransportUnavailable(
                f"cannot connect to Redis at {self.where}: {detail}"
            ) from exc
        self.version = version_of(str(info.get("redis_version", "0.0")))
        self.aof_enabled = bool(int(persistence.get("aof_enabled", 0)))
        problems: list[str] = []
        if self.version < XAUTOCLAIM_VERSION:
            problems.append(
                f"Redis {info.get('redis_version')} is too old: the transport needs Redis 7.0 "
                "or later (XAUTOCLAIM reporting deleted entries)"
            )
        if settings.wait_aof and self.version < WAITAOF_VERSION:
            problems.append(
                f"wait_aof=true needs WAITAOF (Redis 7.2 or later); this server is "
                f"{info.get('redis_version')}: upgrade it or drop wait_aof"
            )
        if settings.wait_aof and not self.aof_enabled:
            problems.append(
                "wait_aof=true needs the append-only file: set 'appendonly yes' on the server "
                "or drop wait_aof"
            )
        if problems:
            await self.close()
            raise TransportError(
                f"Redis at {self.where} cannot serve nervus: {'; '.join(problems)}"
            )

    async def close(self) -> None:
        await self.client.aclose()
