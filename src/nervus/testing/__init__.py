"""Test support shipped with nervus: the conformance suites every backend passes.

``TransportConformance`` and ``EventStoreConformance`` are pytest test classes; a
transport's (a store's) test module subclasses one and provides the
``transport_url`` (``store_url``) fixture. Importing this package
needs pytest (and pytest-asyncio to run the scenarios).
"""

from nervus.testing._scenario import Scenario
from nervus.testing._store_suite import EventStoreConformance
from nervus.testing._transport_suite import TransportConformance

__all__ = ["EventStoreConformance", "Scenario", "TransportConformance"]
