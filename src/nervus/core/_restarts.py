"""Running a follower (a relay, a projection) again after it fails, with backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

FIRST_PAUSE, LONGEST_PAUSE = 0.5, 30.0


async def keep_running(
    follow: Callable[[], Awaitable[None]],
    *,
    name: str,
    logger: logging.Logger,
    failed: Callable[[str], None],
) -> None:
    """Call ``follow`` again whenever it returns or raises, until cancelled.

    A failure is reported to ``failed`` (for health) and logged, then waited out:
    0.5 s, doubling up to 30 s while failures follow each other; a ``follow`` that
    returns normally (it wants to start over) is called again at once and resets
    the pause.
    """
    pause = FIRST_PAUSE
    while True:
        try:
            await follow()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failed(f"{type(exc).__name__}: {exc}")
            logger.error("%s failed, retrying in %.1f s: %s", name, pause, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE)
        else:
            pause = FIRST_PAUSE
