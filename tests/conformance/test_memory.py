"""The in-memory transport passes the transport conformance suite."""

import uuid

import pytest

from nervus.testing import TransportConformance

pytestmark = pytest.mark.unit


class TestMemoryTransport(TransportConformance):
    @pytest.fixture
    def transport_url(self) -> str:
        return f"memory://t-{uuid.uuid4().hex}?partitions=4"
