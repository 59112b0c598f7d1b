"""The in-memory transport: the whole contract inside one process (``memory://NAME``)."""

from nervus.transports.memory._transport import MemoryOptions, MemorySubscription, MemoryTransport

__all__ = ["MemoryOptions", "MemorySubscription", "MemoryTransport"]
