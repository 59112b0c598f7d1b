"""Test support shipped with nervus: the conformance suites every backend passes.

``TransportConformance`` is a pytest test class; a transport's test module
subclasses it and provides the ``transport_url`` fixture. Importing this package
needs pytest (and pytest-asyncio to run the scenarios).
"""

from nervus.testing._scenario import Scenario
from nervus.testing._transport_suite import TransportConformance

__all__ = ["Scenario", "TransportConformance"]
