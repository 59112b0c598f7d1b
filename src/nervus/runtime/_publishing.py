"""Publishing through an outage: retry with backoff while the broker is unreachable.

A publish that fails with a retryable error (``TransportUnavailable``) is tried
again after a growing delay until ``publish_timeout`` has passed, then the error
is raised. Publishing again after a failure can duplicate messages the broker
had accepted before it failed; consumers deduplicate by ``ce_id`` (the inbox).
The outage is logged once when it starts and once when it ends, and recorded in
an ``Outage`` so health reports can show it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from nervus.core import Clock
from nervus.errors import NervusError
from nervus.runtime._retry import RetryPolicy
from nervus.transports import OutgoingMessage, Transport

log = logging.getLogger("nervus.runtime")

_LONGEST_WAIT = 5.0  # seconds between two tries, whatever the backoff settings


class Outage:
    """Whether an operation is failing now, since when, and why."""

    __slots__ = ("error", "since")

    def __init__(self) -> None:
        self.since: float | None = None
        self.error: str | None = None

    def failed(self, what: str, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.time()
            log.warning("%s failed, retrying with backoff: %s", what, exc)
        self.error = str(exc)

    def recovered(self, what: str) -> None:
        if self.since is not None:
            log.warning("%s works again after %.1f s", what, time.time() - self.since)
            self.since = None
            self.error = None

    def describe(self, what: str) -> str | None:
        if self.since is None:
            return None
        return f"{what} failing for {time.time() - self.since:.1f} s: {self.error}"


async def publish(
    transport: Transport,
    channel: str,
    messages: Sequence[OutgoingMessage],
    *,
    timeout: float,
    retry: RetryPolicy,
    clock: Clock,
    outage: Outage,
) -> None:
    """``transport.publish`` retried through an outage for up to ``timeout`` seconds."""
    deadline = clock.monotonic() + timeout
    failures = 0
    while True:
        try:
            await transport.publish(channel, messages)
        except NervusError as exc:
            failures += 1
            wait = min(retry.backoff(failures), _LONGEST_WAIT)
            if not exc.retryable or clock.monotonic() + wait > deadline:
                raise
            outage.failed(f"publishing to {channel!r}", exc)
            await clock.sleep(wait)
            continue
        outage.recovered("publishing")
        return
