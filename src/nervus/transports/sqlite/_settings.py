"""Typed settings of the SQLite transport, read from ``sqlite:///path.db?option=value``."""

from __future__ import annotations

from typing import Literal

import msgspec


class SqliteSettings(msgspec.Struct, kw_only=True):
    """Options of ``sqlite:///path.db?...``; ``validate()`` lists every problem at once.

    ``path`` is the database file (created with its parent directories).
    ``partitions`` is the partition count of channels created by this transport.
    ``synchronous`` is SQLite's durability: ``full`` (survives power loss),
    ``normal`` (survives a process crash; may lose the last commits on power loss)
    or ``off`` (survives a process crash only while the OS keeps running). Under
    ``full``, transactions holding only consumer positions and lease renewals skip
    their own fsync and become durable with the next one: a power loss may bring
    back a few messages already acknowledged, never lose a published one.
    ``lease_seconds`` is how long a member keeps its partitions without a heartbeat;
    ``heartbeat_seconds`` how often it renews (at most a third of the lease).
    ``retention_seconds`` / ``retention_bytes`` bound each partition by age and by
    size (None: keep forever); ``retention_interval`` is how often that is applied.
    ``poll_interval`` is how often an idle consumer checks for commits of other
    processes; ``commit_interval`` how long settled positions may wait before being
    committed; ``busy_timeout`` how long a write waits for another process's lock;
    ``checkpoint_interval`` how often the WAL is copied into the database file (off
    the write path: commits wait only while a checkpoint restarts a WAL of 1,000
    frames or more, at most 0.2 s). ``commit_on_loop``: a lone write,
    when the event loop has nothing else to run, commits on the loop's thread
    instead of the writer's (a thread round trip costs more than the transaction's
    own work; the loop is held for that commit's fsync); ``false`` keeps every
    commit on the writer thread.
    """

    path: str
    partitions: int = 8
    synchronous: Literal["full", "normal", "off"] = "full"
    lease_seconds: float = 10.0
    heartbeat_seconds: float | None = None
    retention_seconds: float | None = None
    retention_bytes: int | None = None
    retention_interval: float = 5.0
    poll_interval: float = 0.004
    commit_interval: float = 0.05
    checkpoint_interval: float = 0.5
    busy_timeout: float = 30.0
    commit_on_loop: bool = True

    @property
    def heartbeat(self) -> float:
        """The heartbeat interval: the option, or a quarter of the lease."""
        return (
            self.heartbeat_seconds if self.heartbeat_seconds is not None else self.lease_seconds / 4
        )

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.path:
            problems.append(
                "the database path is empty; write sqlite:///relative.db or sqlite:////abs.db"
            )
        if not 1 <= self.partitions <= 4096:
            problems.append(f"partitions={self.partitions} must be between 1 and 4096")
        if self.lease_seconds <= 0:
            problems.append(f"lease_seconds={self.lease_seconds} must be positive")
        if self.heartbeat_seconds is not None and not (
            0 < self.heartbeat_seconds <= self.lease_seconds / 3
        ):
            problems.append(
                f"heartbeat_seconds={self.heartbeat_seconds} must be positive and at most a third "
                f"of lease_seconds={self.lease_seconds}, so a member renews before its lease ends"
            )
        if self.retention_seconds is not None and self.retention_seconds <= 0:
            problems.append(f"retention_seconds={self.retention_seconds} must be positive")
        if self.retention_bytes is not None and self.retention_bytes <= 0:
            problems.append(f"retention_bytes={self.retention_bytes} must be positive")
        for name in ("retention_interval", "poll_interval", "busy_timeout", "checkpoint_interval"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.commit_interval < 0:
            problems.append(f"commit_interval={self.commit_interval} must be zero or positive")
        if self.poll_interval > 1:
            problems.append(
                f"poll_interval={self.poll_interval} is above 1 s; consumers would lag that much"
            )
        return problems
