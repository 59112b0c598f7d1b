"""Typed settings of the NATS JetStream transport, read from ``nats://host:4222?option=value``."""

from __future__ import annotations

import re
from typing import Literal

import msgspec

_NAMESPACE = re.compile(r"[A-Za-z0-9-]+")


class NatsSettings(msgspec.Struct, kw_only=True):
    """Options of ``nats://[user:password@]host:4222[,host2:4222]?...``; ``validate()``
    lists every problem at once.

    ``servers`` are the server URLs taken from the location part.
    ``partitions`` is the partition count of channels created by this transport.
    ``namespace`` prefixes everything the transport creates: subjects
    ``<namespace>.<channel>.<partition>``, streams ``<namespace>_<channel>`` and the
    key-value bucket ``<namespace>-groups`` holding group memberships; letters, digits
    and ``-`` only.
    ``storage`` and ``replicas`` are those of the streams created (``file`` survives a
    server restart). ``duplicate_window`` is how long JetStream remembers ``ce_id`` to
    drop duplicate publishes. ``retention_seconds`` / ``retention_bytes`` bound each
    channel by age and size (None: keep forever).
    ``lease_seconds`` is how long a member keeps its partitions without a heartbeat;
    ``heartbeat_seconds`` how often it renews (at most a third of the lease and of
    ``ack_wait``); ``check_interval`` how often it looks for joins and departures.
    ``ack_wait`` is how long the server waits for the settlement of a delivery before
    it delivers it again (a live member extends it by heartbeat for what it holds, so
    it bounds how long the messages of a dead member stay away). It applies to the
    group consumers this transport creates.
    ``connect_timeout`` bounds ``connect()``; ``request_timeout`` bounds each request
    to the server (publish acknowledgements, stream and consumer management), including
    the wait for the client to reconnect while the server is unreachable: a publish
    during an outage fails with ``TransportUnavailable`` after at most that long.
    """

    servers: list[str]
    partitions: int = 8
    namespace: str = "nervus"
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    duplicate_window: float = 120.0
    retention_seconds: float | None = None
    retention_bytes: int | None = None
    lease_seconds: float = 10.0
    heartbeat_seconds: float | None = None
    check_interval: float = 0.1
    ack_wait: float = 30.0
    connect_timeout: float = 5.0
    request_timeout: float = 10.0

    @property
    def heartbeat(self) -> float:
        """The heartbeat interval: the option, or the smaller of a quarter of the lease
        and a quarter of ``ack_wait``."""
        if self.heartbeat_seconds is not None:
            return self.heartbeat_seconds
        return min(self.lease_seconds, self.ack_wait) / 4

    @property
    def groups_bucket(self) -> str:
        """The key-value bucket holding the consumer groups' memberships."""
        return f"{self.namespace}-groups"

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.servers:
            problems.append("no server given; write nats://host:4222")
        if not 1 <= self.partitions <= 1024:
            problems.append(f"partitions={self.partitions} must be between 1 and 1024")
        if not _NAMESPACE.fullmatch(self.namespace):
            problems.append(
                f"namespace={self.namespace!r} must be letters, digits and '-' only "
                "(it starts subjects, stream and bucket names)"
            )
        elif self.namespace.upper() in ("KV", "OBJ"):
            problems.append(
                f"namespace={self.namespace!r} is reserved by JetStream's key-value and object "
                "stores; choose another"
            )
        if not 1 <= self.replicas <= 5:
            problems.append(f"replicas={self.replicas} must be between 1 and 5")
        if self.duplicate_window < 0:
            problems.append(f"duplicate_window={self.duplicate_window} must be zero or positive")
        if self.retention_seconds is not None and self.retention_seconds <= 0:
            problems.append(f"retention_seconds={self.retention_seconds} must be positive")
        if self.retention_bytes is not None and self.retention_bytes <= 0:
            problems.append(f"retention_bytes={self.retention_bytes} must be positive")
        for name in (
            "lease_seconds",
            "check_interval",
            "ack_wait",
            "connect_timeout",
            "request_timeout",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.heartbeat_seconds is not None and not (
            0 < self.heartbeat_seconds <= min(self.lease_seconds, self.ack_wait) / 3
        ):
            problems.append(
                f"heartbeat_seconds={self.heartbeat_seconds} must be positive and at most a third "
                f"of lease_seconds={self.lease_seconds} and of ack_wait={self.ack_wait}, so a "
                "member renews its lease and its deliveries before they run out"
            )
        if self.check_interval > 5:
            problems.append(
                f"check_interval={self.check_interval} is above 5 s; "
                "rebalancing would lag that much"
            )
        return problems
