"""Typed settings of the Kafka transport, read from ``kafka://host:port[,host:port]?option=value``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import msgspec

from nervus.errors import ConfigurationError
from nervus.transports._urls import parse_options

EXTRA_PREFIX = "librdkafka."
"""URL options starting with this prefix are passed to librdkafka as they are."""

DEFAULT_PORT = 9092

# librdkafka properties the transport sets itself because the contract depends on
# them (durability, group membership, commits); an extra option may not change them.
RESERVED = frozenset(
    {
        "bootstrap.servers",
        "metadata.broker.list",
        "group.id",
        "group.instance.id",
        "group.protocol",
        "partition.assignment.strategy",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "enable.partition.eof",
        "enable.idempotence",
        "acks",
        "request.required.acks",
        "transactional.id",
        "queued.min.messages",
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.password",
        "compression.type",
        "compression.codec",
        "linger.ms",
        "queue.buffering.max.ms",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "queued.max.messages.kbytes",
        "client.id",
    }
)


class KafkaSettings(msgspec.Struct, kw_only=True):
    """Options of ``kafka://[user:password@]host:port[,host:port...]?...``;
    ``validate()`` lists every problem at once.

    ``bootstrap_servers`` comes from the URL's hosts (port 9092 when omitted);
    ``username`` / ``password`` from its user info (SASL credentials, with
    ``security_protocol=sasl_plaintext`` or ``sasl_ssl``).

    ``partitions`` and ``replication_factor`` shape the topics this transport
    creates (channels, their per-group retry topics, dead-letter channels); a
    topic that exists keeps its own. ``compression`` (``none``, ``gzip``,
    ``snappy``, ``lz4``, ``zstd``) and ``linger_ms`` (how long the producer waits
    to fill a batch) tune publishing; ``delivery_timeout`` is how long it retries a
    message before the publish fails.

    ``session_timeout`` is how long a consumer that stopped heartbeating (a dead
    process) keeps its partitions; ``heartbeat_interval`` how often members
    heartbeat (at most a third of the session; also how fast members notice a
    rebalance); ``max_poll_interval`` how long a member's consumer may go
    unserved before it is put out of the group (each member serves its consumer
    on a thread of its own, also while the caller is busy, so this bounds a
    stuck member, not a slow handler). ``commit_interval`` is how long settled
    positions may wait before they are committed. ``prefetch_kbytes`` bounds what
    librdkafka reads ahead per partition; a subscription holds at most
    ``max_in_flight`` deliveries read ahead besides.

    ``connect_timeout`` bounds ``connect()`` when the cluster does not answer;
    ``request_timeout`` bounds administrative requests (topic creation, offset
    look-ups for replay).

    Any other librdkafka property can be given as ``librdkafka.<property>=<value>``
    (for example ``librdkafka.ssl.ca.location=/etc/ssl/ca.pem``); the properties
    the transport's guarantees rest on (``RESERVED``) are refused.
    """

    bootstrap_servers: str
    username: str | None = None
    password: str | None = None
    partitions: int = 8
    replication_factor: int = 1
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    linger_ms: float = 5.0
    delivery_timeout: float = 120.0
    session_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    max_poll_interval: float = 300.0
    commit_interval: float = 0.05
    prefetch_kbytes: int = 8192
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    security_protocol: Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"] = "plaintext"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    client_id: str = "nervus"
    librdkafka: dict[str, str] = msgspec.field(default_factory=dict)

    def __repr__(self) -> str:
        secret = "" if self.password is None else ", password='***'"
        return f"KafkaSettings(bootstrap_servers={self.bootstrap_servers!r}{secret}, ...)"

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.bootstrap_servers:
            problems.append("name at least one broker, e.g. kafka://127.0.0.1:9092")
        if self.partitions < 1:
            problems.append(f"partitions={self.partitions} must be at least 1")
        if self.replication_factor < 1:
            problems.append(f"replication_factor={self.replication_factor} must be at least 1")
        for name in ("delivery_timeout", "connect_timeout", "request_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if not 0 <= self.linger_ms <= 900_000:
            problems.append(f"linger_ms={self.linger_ms} must be between 0 and 900000")
        if self.commit_interval < 0:
            problems.append(f"commit_interval={self.commit_interval} must be zero or positive")
        if self.prefetch_kbytes < 1:
            problems.append(f"prefetch_kbytes={self.prefetch_kbytes} must be at least 1")
        if self.session_timeout <= 0:
            problems.append(f"session_timeout={self.session_timeout} must be positive")
        elif not 0 < self.heartbeat_interval <= self.session_timeout / 3:
            problems.append(
                f"heartbeat_interval={self.heartbeat_interval} must be positive and at most a "
                f"third of session_timeout={self.session_timeout}"
            )
        if self.max_poll_interval < self.session_timeout:
            problems.append(
                f"max_poll_interval={self.max_poll_interval} must be at least "
                f"session_timeout={self.session_timeout}"
            )
        if self.username is not None and not self.security_protocol.startswith("sasl"):
            problems.append(
                "the URL carries credentials but security_protocol="
                f"{self.security_protocol}; add security_protocol=sasl_ssl (or sasl_plaintext)"
            )
        if self.security_protocol.startswith("sasl") and self.username is None:
            problems.append(
                f"security_protocol={self.security_protocol} needs credentials: "
                "kafka://user:password@host:9092"
            )
        for name in sorted(self.librdkafka):
            if name in RESERVED or name.endswith("_cb"):
                problems.append(
                    f"{EXTRA_PREFIX}{name} is set by the transport itself and cannot be changed"
                    + _instead(name)
                )
        return problems

    # -- librdkafka configurations -------------------------------------------------

    def common_config(self, log: logging.Logger) -> dict[str, Any]:
        """What every client of this transport (producer, consumers, admin) shares."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
            "error_cb": _error_logger(log),
            "logger": log,
        }
        if self.username is not None:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.username
            config["sasl.password"] = self.password or ""
        config.update(self.librdkafka)
        return config

    def producer_config(self, log: logging.Logger) -> dict[str, Any]:
        config = self.common_config(log)
        config.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": self.compression,
                "linger.ms": self.linger_ms,
                "message.timeout.ms": int(self.delivery_timeout * 1000),
                # The Java client's partitioner: the same key reaches the same
                # partition whichever client (Java, Go, librdkafka) publishes it.
                "partitioner": self.librdkafka.get("partitioner", "murmur2_random"),
            }
        )
        return config

    def consumer_config(
        self, log: logging.Logger, group: str, max_in_flight: int
    ) -> dict[str, Any]:
        config = self.common_config(log)
        config.update(
            {
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "partition.assignment.strategy": "cooperative-sticky",
                "auto.offset.reset": "earliest",
                "session.timeout.ms": int(self.session_timeout * 1000),
                "heartbeat.interval.ms": max(int(self.heartbeat_interval * 1000), 1),
                "max.poll.interval.ms": int(self.max_poll_interval * 1000),
                "queued.min.messages": max(max_in_flight, 1),
                "queued.max.messages.kbytes": self.prefetch_kbytes,
            }
        )
        return config

    def retry_consumer_config(
        self, log: logging.Logger, group: str, max_in_flight: int
    ) -> dict[str, Any]:
        """A consumer of retry topics, assigned by hand: ``group`` only stores positions."""
        config = self.common_config(log)
        config.update(
            {
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "queued.min.messages": max(min(max_in_flight, 1000), 1),
                "queued.max.messages.kbytes": self.prefetch_kbytes,
            }
        )
        return config

    def admin_config(self, log: logging.Logger) -> dict[str, Any]:
        return self.common_config(log)


def _instead(name: str) -> str:
    hints = {
        "security.protocol": "security_protocol",
        "sasl.mechanism": "sasl_mechanism",
        "sasl.mechanisms": "sasl_mechanism",
        "sasl.username": "the URL's user info (kafka://user:password@host)",
        "sasl.password": "the URL's user info (kafka://user:password@host)",
        "compression.type": "compression",
        "compression.codec": "compression",
        "linger.ms": "linger_ms",
        "queue.buffering.max.ms": "linger_ms",
        "message.timeout.ms": "delivery_timeout",
        "delivery.timeout.ms": "delivery_timeout",
        "session.timeout.ms": "session_timeout",
        "heartbeat.interval.ms": "heartbeat_interval",
        "max.poll.interval.ms": "max_poll_interval",
        "queued.max.messages.kbytes": "prefetch_kbytes",
        "client.id": "client_id",
        "bootstrap.servers": "the URL's hosts",
    }
    hint = hints.get(name)
    return f"; use the option {hint} instead" if hint else ""


def _error_logger(log: logging.Logger) -> Callable[[Any], None]:
    def report(error: Any) -> None:
        log.warning("Kafka client error: %s", error)

    return report


def parse_url(url: str, key: str) -> KafkaSettings:
    """``KafkaSettings`` from a ``kafka://`` URL, naming ``key`` in every problem."""
    parts = urlsplit(url)
    shown = redact(url)
    if parts.scheme != "kafka":
        raise ConfigurationError([f"{key}={shown!r}: expected a kafka:// URL"])
    problems: list[str] = []
    if parts.path not in ("", "/"):
        problems.append(
            f"{key}={shown!r}: a Kafka URL has no path; write kafka://host:9092[,host:9092]?options"
        )
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        name, colon, secret = userinfo.partition(":")
        username = unquote(name)
        password = unquote(secret) if colon else None
    servers: list[str] = []
    for part in hosts.split(","):
        if not part:
            continue
        try:
            address = urlsplit(f"//{part}")
            host, port = address.hostname, address.port or DEFAULT_PORT
        except ValueError as exc:
            problems.append(f"{key}={shown!r}: bad broker address {part!r}: {exc}")
            continue
        if not host:
            problems.append(f"{key}={shown!r}: bad broker address {part!r}: no host")
            continue
        servers.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not servers:
        problems.append(f"{key}={shown!r}: name at least one broker, e.g. kafka://127.0.0.1:9092")
    query = parse_qsl(parts.query, keep_blank_values=True)
    extra = {k[len(EXTRA_PREFIX) :]: v for k, v in query if k.startswith(EXTRA_PREFIX)}
    own = urlencode([(k, v) for k, v in query if not k.startswith(EXTRA_PREFIX)])
    if problems:
        raise ConfigurationError(problems)
    return parse_options(
        urlunsplit((parts.scheme, hosts, "", own, "")),
        KafkaSettings,
        key=key,
        bootstrap_servers=",".join(servers),
        username=username,
        password=password,
        librdkafka=extra,
    )


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.partition("@")
    if not (sep and at and ":" in userinfo and "/" not in userinfo):
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"
