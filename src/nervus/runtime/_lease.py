"""A lease kept as a store checkpoint: one relay of a name works, the others wait.

The checkpoint holds the lease's expiry (milliseconds since the epoch) and its
holder's random tag in one integer. Taking, renewing and giving it up are
compare-and-set moves in a store transaction, so two processes never both think
they took it from the same state; a holder that stops renewing (killed, paused)
loses it when it expires.
"""

from __future__ import annotations

import contextlib
import random
import time

from nervus.storage import EventStore

_OWNER_BITS = 20
_OWNER_MASK = (1 << _OWNER_BITS) - 1


class Lease:
    """The lease stored under the checkpoint ``name`` of ``store``."""

    def __init__(self, store: EventStore, name: str, seconds: float) -> None:
        self.store = store
        self.name = name
        self.seconds = seconds
        self._owner = random.getrandbits(_OWNER_BITS)

    async def acquire(self) -> bool:
        """Take or renew the lease; False while another holder's is still running."""
        now = time.time()
        async with self.store.transaction() as tx:
            current = await tx.load_checkpoint(self.name)
            holder, until = current & _OWNER_MASK, (current >> _OWNER_BITS) / 1000
            if current and holder != self._owner and until > now:
                return False
            renewed = (int((now + self.seconds) * 1000) << _OWNER_BITS) | self._owner
            return await tx.move_checkpoint(self.name, current, renewed)

    async def release(self) -> None:
        """Give the lease up (on a clean stop) so another holder takes it at once."""
        with contextlib.suppress(Exception):
            async with self.store.transaction() as tx:
                current = await tx.load_checkpoint(self.name)
                if current & _OWNER_MASK == self._owner:
                    await tx.move_checkpoint(self.name, current, 0)
