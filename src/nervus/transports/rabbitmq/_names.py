"""Names of what the RabbitMQ transport declares, and the header names it adds.

Per channel ``C`` with ``N`` partitions:

* ``nervus.C.P`` — stream queue of partition ``P`` (the log), ``P`` being
  ``partition_for(KEY)``; nervus publishes to it over the stream protocol, the
  key in the header ``nervus_key``;
* ``nervus.C`` — topic exchange routing ``P.KEY`` (``P`` when there is no key) to
  partition ``P``'s stream, bound with ``P.#``: for AMQP 0-9-1 publishers, whose
  messages the subscription reads the key of from the routing key;
* ``nervus.C.partitions`` — empty queue whose ``x-max-length`` records ``N``.

Per group ``G`` reading channel ``C``, for each partition ``P``:

* ``nervus.C.G.P.offset`` — holds the group's committed position (one message);
* ``nervus.C.G.P.lock`` — exclusive queue: the member whose connection declared it
  owns the partition; the broker deletes it when that connection drops;
* ``nervus.C.G.P.retry`` — messages nacked for redelivery, fed by the headers
  exchange ``nervus.C.G.retry`` directly (no delay) or through the delay queues
  ``nervus.C.G.delay.MS`` (per-queue TTL, dead-lettered into that exchange).

Per group: ``nervus.G.members`` — fanout exchange carrying members' announcements.
"""

from __future__ import annotations

import math

PREFIX = "nervus"
MAX_NAME = 255

# Headers the transport adds to a message and removes before handing it out.
PUBLISHED_MS = "nervus_published_ms"
ATTEMPT = "nervus_attempt"
OFFSET = "nervus_offset"
PARTITION = "nervus_partition"
KEY = "nervus_key"
BROKER_HEADERS = frozenset(
    {
        "x-stream-offset",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
        PUBLISHED_MS,
        ATTEMPT,
        OFFSET,
        PARTITION,
        KEY,
    }
)


def exchange(channel: str) -> str:
    return f"{PREFIX}.{channel}"


def stream(channel: str, partition: int) -> str:
    return f"{PREFIX}.{channel}.{partition}"


def partition_record(channel: str) -> str:
    return f"{PREFIX}.{channel}.partitions"


def offset_queue(channel: str, group: str, partition: int) -> str:
    return f"{PREFIX}.{channel}.{group}.{partition}.offset"


def lock_queue(channel: str, group: str, partition: int) -> str:
    return f"{PREFIX}.{channel}.{group}.{partition}.lock"


def retry_queue(channel: str, group: str, partition: int) -> str:
    return f"{PREFIX}.{channel}.{group}.{partition}.retry"


def retry_exchange(channel: str, group: str) -> str:
    return f"{PREFIX}.{channel}.{group}.retry"


def delay_queue(channel: str, group: str, milliseconds: int) -> str:
    return f"{PREFIX}.{channel}.{group}.delay.{milliseconds}"


def members_exchange(group: str) -> str:
    return f"{PREFIX}.{group}.members"


def delay_bucket(delay: float) -> int:
    """``delay`` seconds rounded up to two significant digits, in milliseconds, so
    one delay queue (with one TTL, hence no head-of-line blocking) serves each
    rounded delay, and a message never comes back earlier than asked."""
    ms = max(1, math.ceil(delay * 1000))
    if ms < 100:
        return ms
    step = 10 ** (len(str(ms)) - 2)
    return int(-(-ms // step) * step)


def too_long(channel: str, group: str | None = None) -> list[str]:
    """Problems with names built from ``channel`` (and ``group``) over AMQP's limit."""
    longest = (
        delay_queue(channel, group, 10**12) if group is not None else partition_record(channel)
    )
    if len(longest.encode()) <= MAX_NAME:
        return []
    what = f"channel {channel!r}" + (f" with group {group!r}" if group is not None else "")
    return [
        f"{what}: the queue names built from them exceed RabbitMQ's {MAX_NAME} bytes; "
        "use shorter names"
    ]
