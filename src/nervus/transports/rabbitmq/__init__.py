"""The RabbitMQ transport: channels as partitioned streams, groups as lock-owning members.

``amqp://user:password@host:5672/vhost?partitions=8&heartbeat_seconds=1`` — see
``RabbitSettings``.
"""

from nervus.transports.rabbitmq._settings import RabbitSettings
from nervus.transports.rabbitmq._subscription import RabbitSubscription
from nervus.transports.rabbitmq._transport import RabbitTransport

__all__ = ["RabbitSettings", "RabbitSubscription", "RabbitTransport"]
