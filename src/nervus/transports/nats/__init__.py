"""The NATS JetStream transport: a stream per channel, durable pull consumers per
group and partition, group leases in a key-value bucket.

``nats://127.0.0.1:4222?partitions=8&namespace=nervus`` — see ``NatsSettings``.
"""

from nervus.transports.nats._settings import NatsSettings
from nervus.transports.nats._subscription import NatsSubscription
from nervus.transports.nats._transport import NatsTransport

__all__ = ["NatsSettings", "NatsSubscription", "NatsTransport"]
