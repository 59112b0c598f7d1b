"""What happens after a handler fails: retry in process, redeliver later, or dead-letter."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from nervus.runtime._config import Settings


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of a failing handler.

    Each delivery runs the handler up to ``1 + immediate_retries`` times in a row.
    If every run fails, the delivery is redelivered (``nack``) after
    ``backoff(attempt)`` seconds, until delivery ``max_attempts`` has failed as
    well; then it is dead-lettered.

    The delay before delivery ``attempt + 1`` is
    ``min(max, initial * multiplier ** (attempt - 1))`` with up to ``jitter`` of
    it (a fraction) taken off at random, so that failures at the same moment do
    not come back at the same moment.
    """

    immediate_retries: int = 2
    max_attempts: int = 5
    initial: float = 1.0
    multiplier: float = 2.0
    max: float = 60.0
    jitter: float = 0.2

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            immediate_retries=settings.immediate_retries,
            max_attempts=settings.max_attempts,
            initial=settings.backoff_initial,
            multiplier=settings.backoff_multiplier,
            max=settings.backoff_max,
            jitter=settings.backoff_jitter,
        )

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before redelivering a message whose delivery ``attempt`` failed.

        ``rand`` returns a number in [0, 1); pass a seeded one to make it repeatable.
        """
        exponent = max(0, attempt - 1)
        try:
            delay = self.initial * self.multiplier**exponent
        except OverflowError:
            delay = self.max
        delay = min(self.max, delay)
        return delay * (1.0 - self.jitter * rand())

    def exhausted(self, attempt: int) -> bool:
        """Whether a failed delivery ``attempt`` was the last one allowed."""
        return attempt >= self.max_attempts
