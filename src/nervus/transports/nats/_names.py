"""How channels and groups map to JetStream names: subjects, streams, consumers, keys.

Subjects keep the channel as it is (``<namespace>.<channel>.<partition>``), so plain
NATS clients publish and subscribe with the names nervus uses. Stream, consumer and
key names allow fewer characters, so everything but letters, digits, ``_`` and
``-`` is escaped as ``=XX`` (the UTF-8 bytes in hex): the mapping is deterministic and
never maps two names to one.
"""

from __future__ import annotations

import re

from nervus.errors import ConfigurationError

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_BAD_TOKEN = re.compile(r"[\s*>]")
_LONGEST = 200  # stream and consumer names become file names on the server


def escape(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9_-]`` written as ``=XX``."""
    if all(c in _SAFE for c in name):
        return name
    return "".join(c if c in _SAFE else "".join(f"={b:02X}" for b in c.encode()) for c in name)


def check_channel(channel: str) -> None:
    """Raise ``ConfigurationError`` unless ``channel`` can be part of a subject."""
    problems = []
    if not channel:
        problems.append("a channel name must not be empty")
    elif any(not token or _BAD_TOKEN.search(token) for token in channel.split(".")):
        problems.append(
            f"channel {channel!r} cannot be a NATS subject: use dot-separated, non-empty "
            "tokens without spaces, '*' or '>'"
        )
    elif len(escape(channel)) > _LONGEST:
        problems.append(
            f"channel {channel!r} is too long for a JetStream stream name; "
            f"keep it under about {_LONGEST // 3} characters"
        )
    if problems:
        raise ConfigurationError(problems)


def check_group(group: str) -> None:
    if not group:
        raise ConfigurationError(["a consumer group name must not be empty"])
    if len(escape(group)) > _LONGEST:
        raise ConfigurationError(
            [f"group {group!r} is too long for a JetStream consumer name; shorten it"]
        )


def stream_name(namespace: str, channel: str) -> str:
    return f"{namespace}_{escape(channel)}"


def partition_subject(namespace: str, channel: str, partition: int) -> str:
    return f"{namespace}.{channel}.{partition}"


def consumer_name(group: str, partition: int) -> str:
    """The durable consumer of ``group`` on one partition of a channel's stream (the
    part after the last ``_`` is the partition, so the name is unambiguous)."""
    return f"{escape(group)}_{partition}"


def group_key(group: str) -> str:
    """The key of a group's membership record in the groups bucket."""
    return f"group.{escape(group)}"
