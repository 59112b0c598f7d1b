"""The connection to Redis: opening it, the registered scripts, turning client
errors into nervus errors, and noticing when the server goes away and comes back."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from nervus.errors import TransportError, TransportUnavailable
from nervus.transports.redis import _scripts
from nervus.transports.redis._settings import RedisSettings

log = logging.getLogger("nervus.transports.redis")

# The client errors that mean the server could not be reached or did not answer
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)

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


def version_of(text: str) -> tuple[int, int]:
    major, _, rest = text.partition(".")
    minor = rest.partition(".")[0]
    return (int(major), int(minor or 0))


_MAX_CONNECTIONS = 64  # per transport; calls beyond it wait their turn


class _PackedByHiredis:
    """Commands written by hiredis (C), as redis-py's blocking client does, instead of
    its asyncio client's Python packer: about a microsecond per XADD instead of
    five to nine, the same bytes."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str):  # a name of several words ("CLIENT SETNAME") is split
            args = (*name.encode().split(), *args[1:])
        elif b" " in name:
            args = (*name.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            pass
        args = tuple(bytes(a) if isinstance(a, bytearray) else a for a in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # what redis-py raises for a value it cannot send
            raise DataError(str(exc)) from exc


class _TcpConnection(_PackedByHiredis, aioredis.Connection):
    pass


class _TlsConnection(_PackedByHiredis, aioredis.SSLConnection):
    pass


_PACKED_BY_HIREDIS: dict[type[Any], type[Any]] = {
    aioredis.Connection: _TcpConnection,
    aioredis.SSLConnection: _TlsConnection,
}


class Connection:
    """A pooled client to one Redis server and the scripts registered on it."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.where = redact(settings.address)
        # A blocking pool: when every connection is busy (many handlers publishing at
        # once), a call waits for one instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.address,
            max_connections=_MAX_CONNECTIONS,
            timeout=settings.command_timeout,
            socket_connect_timeout=settings.connect_timeout,
            socket_timeout=settings.command_timeout,
            health_check_interval=30,
            # No silent retries: a read retried after its answer was lost would leave
            # entries pending that nobody saw; failures surface and are handled here.
            retry=Retry(NoBackoff(), 0),
        )
        pool.connection_class = _PACKED_BY_HIREDIS.get(pool.connection_class, pool.connection_class)
        self.client: aioredis.Redis = aioredis.Redis.from_pool(pool)  # closes the pool with it
        self.renew: AsyncScript = self.client.register_script(_scripts.RENEW)
        self.leave: AsyncScript = self.client.register_script(_scripts.LEAVE)
        self.nack: AsyncScript = self.client.register_script(_scripts.NACK)
        self.replay: AsyncScript = self.client.register_script(_scripts.REPLAY)
        self.prune: AsyncScript = self.client.register_script(_scripts.PRUNE)
        self.version = (0, 0)
        self.aof_enabled = False
        self._down_since: float | None = None
        self._dropping: asyncio.Task[None] | None = None

    # -- outages ------------------------------------------------------------------

    @property
    def down(self) -> bool:
        """Whether the last call that reached for the server found it unreachable."""
        return self._down_since is not None

    def failed(
        self, exc: BaseException, what: str, *, channel: str | None = None
    ) -> TransportError:
        """The nervus error for a failed Redis call, naming the server: unavailable
        (a retry can help) when the connection failed or timed out, which also marks
        the start of an outage; else a plain transport error."""
        if isinstance(exc, CONNECTION_ERRORS):
            self.lost(exc)
            return TransportUnavailable(
                f"{what}: Redis at {self.where} is unreachable ({exc or type(exc).__name__}); "
                "retry once it is back",
                channel=channel,
            )
        return TransportError(
            f"{what}: Redis at {self.where} refused ({type(exc).__name__}: {exc})",
            channel=channel,
        )

    def lost(self, exc: BaseException) -> None:
        """Note that a call could not reach the server; the first of an outage logs
        a warning, the others of the same outage only count."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "Redis at %s is unreachable (%s: %s); publishing fails with "
                "TransportUnavailable and subscriptions retry until it is back",
                self.where,
                type(exc).__name__,
                exc,
            )
            # The pool's idle connections lead to the server that went away: drop them,
            # so that once it is back each does not fail one more call.
            if self._dropping is None or self._dropping.done():
                self._dropping = asyncio.get_running_loop().create_task(self._drop_idle())

    async def _drop_idle(self) -> None:
        try:
            await self.client.connection_pool.disconnect(inuse_connections=False)
        except (RedisError, OSError) as exc:
            log.debug("closing idle connections to Redis at %s failed: %s", self.where, exc)

    def reached(self) -> None:
        """Note that a call reached the server; ends an outage, logging how long it was."""
        since = self._down_since
        if since is not None:
            self._down_since = None
            log.info(
                "Redis at %s is reachable again after %.1f s", self.where, time.monotonic() - since
            )

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
        dropping, self._dropping = self._dropping, None
        if dropping is not None:
            await asyncio.gather(dropping, return_exceptions=True)
        await self.client.aclose()
