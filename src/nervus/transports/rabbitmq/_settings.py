"""Typed settings of the RabbitMQ transport, read from ``amqp://host/vhost?option=value``."""

from __future__ import annotations

import msgspec


class RabbitSettings(msgspec.Struct, kw_only=True):
    """Options of ``amqp://user:password@host:port/vhost?...``; ``validate()`` lists
    every problem at once.

    ``amqp_url`` is the URL without the nervus options (what the client connects to).
    ``partitions`` is the partition count of channels created by this transport (a
    channel that exists keeps its count). ``connect_timeout`` bounds ``connect()`` and
    each reconnection attempt; ``publish_timeout`` bounds how long ``publish`` waits
    for the broker's confirms. ``stream_port`` is the port of the broker's stream
    protocol listener (the ``rabbitmq_stream`` plugin) on the URL's host: channel
    messages are published over it, straight to the partition's stream.
    ``heartbeat_seconds`` is how often a group member announces itself;
    ``session_seconds`` how long a member that stopped announcing still counts as
    alive (a member that closes says so and leaves at once; a crashed member's
    partitions are unlocked by the broker as soon as its connection drops).
    ``commit_interval`` is how long settled positions may wait before being
    committed. ``max_age`` (e.g. ``7D``, ``12h``) and ``max_bytes`` bound the
    retention of the streams of channels created by this transport (None: keep all).
    """

    amqp_url: str
    partitions: int = 8
    connect_timeout: float = 10.0
    publish_timeout: float = 30.0
    stream_port: int = 5552
    heartbeat_seconds: float = 1.0
    session_seconds: float = 6.0
    commit_interval: float = 0.2
    max_age: str | None = None
    max_bytes: int | None = None

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not 1 <= self.partitions <= 1024:
            problems.append(f"partitions={self.partitions} must be between 1 and 1024")
        if not 1 <= self.stream_port <= 65535:
            problems.append(f"stream_port={self.stream_port} must be a TCP port, 1 to 65535")
        for name in ("connect_timeout", "publish_timeout", "heartbeat_seconds", "session_seconds"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.session_seconds < 3 * self.heartbeat_seconds:
            problems.append(
                f"session_seconds={self.session_seconds} must be at least three times "
                f"heartbeat_seconds={self.heartbeat_seconds}, so one late announcement does "
                "not make a member look gone"
            )
        if self.commit_interval < 0:
            problems.append(f"commit_interval={self.commit_interval} must be zero or positive")
        if self.max_age is not None and not _valid_age(self.max_age):
            problems.append(
                f"max_age={self.max_age!r} must be a number and a unit among Y, M, D, h, m, s "
                "(e.g. 7D or 12h)"
            )
        if self.max_bytes is not None and self.max_bytes <= 0:
            problems.append(f"max_bytes={self.max_bytes} must be positive")
        return problems


def _valid_age(text: str) -> bool:
    return len(text) > 1 and text[:-1].isdigit() and int(text[:-1]) > 0 and text[-1] in "YMDhms"


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"
