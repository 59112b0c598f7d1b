"""The Apache Kafka transport (librdkafka through confluent-kafka).

``kafka://127.0.0.1:9092[,host:port...]?partitions=8&compression=lz4`` — see
``KafkaSettings`` for every option and ``KafkaTransport`` for how groups,
offsets, delayed redelivery and replay map to Kafka.
"""

from nervus.transports.kafka._settings import KafkaSettings
from nervus.transports.kafka._subscription import KafkaSubscription, retry_group, retry_topic
from nervus.transports.kafka._transport import KafkaTransport

__all__ = ["KafkaSettings", "KafkaSubscription", "KafkaTransport", "retry_group", "retry_topic"]
