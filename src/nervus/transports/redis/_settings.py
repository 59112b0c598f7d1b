"""Typed settings of the Redis Streams transport, read from ``redis://host:port/db?option=value``."""

from __future__ import annotations

import msgspec


class RedisSettings(msgspec.Struct, kw_only=True):
    """Options of ``redis://[user:password@]host:port/db?...``; ``validate()`` lists every
    problem at once.

    ``address`` is the server URL without the options (taken from the URL itself).
    ``partitions`` is the partition count of channels created by this transport (one
    stream per partition). ``prefix`` starts every key nervus writes.

    Retention: ``maxlen`` trims each partition's stream to about that many entries
    (``XADD ... MAXLEN ~``); ``retention_seconds`` drops entries older than that
    (``XADD ... MINID ~``, by the publishing process's clock). At most one of them;
    None keeps everything. Trimming is approximate (whole stream nodes) and does
    not wait for consumers.

    Durability: ``wait_aof`` makes ``publish`` and ``nack`` wait until Redis has
    written the change to its append-only file (``WAITAOF``; Redis 7.2+ with
    ``appendonly yes``), and to ``wait_replicas`` replicas' files as well.
    Without ``wait_aof``, ``wait_replicas`` > 0 waits until that many replicas
    received the change (``WAIT``). ``wait_timeout`` bounds either wait; a wait
    that falls short fails the call.

    Groups: ``lease_seconds`` is how long a member keeps its partitions without a
    heartbeat; ``heartbeat_seconds`` how often it renews (at most a third of the
    lease; default a quarter). ``block_seconds`` is the longest one read waits on
    the server for new entries (a renewal that gives partitions away waits for
    the read in progress, so keep it well under the lease). ``commit_interval``
    is how long acknowledgements may wait to be sent together.

    Connections: ``connect_timeout`` bounds ``connect()``; ``command_timeout``
    bounds any one command on the wire.
    """

    address: str
    partitions: int = 8
    prefix: str = "nervus"
    maxlen: int | None = None
    retention_seconds: float | None = None
    wait_aof: bool = False
    wait_replicas: int = 0
    wait_timeout: float = 5.0
    lease_seconds: float = 10.0
    heartbeat_seconds: float | None = None
    block_seconds: float = 0.25
    commit_interval: float = 0.02
    connect_timeout: float = 5.0
    command_timeout: float = 10.0

    @property
    def heartbeat(self) -> float:
        """The heartbeat interval: the option, or a quarter of the lease."""
        return (
            self.heartbeat_seconds if self.heartbeat_seconds is not None else self.lease_seconds / 4
        )

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.address:
            problems.append("the server address is empty; write redis://host:port/db")
        if not 1 <= self.partitions <= 4096:
            problems.append(f"partitions={self.partitions} must be between 1 and 4096")
        if not self.prefix:
            problems.append("prefix must not be empty; it starts every key nervus writes")
        if self.maxlen is not None and self.maxlen <= 0:
            problems.append(f"maxlen={self.maxlen} must be positive")
        if self.retention_seconds is not None and self.retention_seconds <= 0:
            problems.append(f"retention_seconds={self.retention_seconds} must be positive")
        if self.maxlen is not None and self.retention_seconds is not None:
            problems.append(
                "give maxlen or retention_seconds, not both: Redis trims a stream by one "
                "rule per XADD"
            )
        if self.wait_replicas < 0:
            problems.append(f"wait_replicas={self.wait_replicas} must be zero or positive")
        for name in ("wait_timeout", "lease_seconds", "block_seconds", "connect_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.heartbeat_seconds is not None and not (
            0 < self.heartbeat_seconds <= self.lease_seconds / 3
        ):
            problems.append(
                f"heartbeat_seconds={self.heartbeat_seconds} must be positive and at most a third "
                f"of lease_seconds={self.lease_seconds}, so a member renews before its lease ends"
            )
        if self.lease_seconds > 0 and self.block_seconds > self.lease_seconds / 4:
            problems.append(
                f"block_seconds={self.block_seconds} must be at most a quarter of "
                f"lease_seconds={self.lease_seconds}: a renewal may wait for a read that long"
            )
        if self.commit_interval < 0:
            problems.append(f"commit_interval={self.commit_interval} must be zero or positive")
        wait_longest = max(self.block_seconds, self.wait_timeout)
        if self.command_timeout <= wait_longest:
            problems.append(
                f"command_timeout={self.command_timeout} must be longer than block_seconds and "
                f"wait_timeout ({wait_longest}), which commands wait on the server"
            )
        return problems
