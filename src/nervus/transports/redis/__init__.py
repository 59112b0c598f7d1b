"""The Redis Streams transport: a stream per partition, consumer groups with
partition ownership by lease, delayed redelivery, replay.

``redis://[user:password@]host:6379/0?partitions=8&maxlen=1000000`` — see
``RedisSettings``. Needs the ``redis`` client (``pip install 'nervus[redis]'``)
and Redis 7.0 or later. While the server is unreachable, calls fail with the
retryable ``TransportUnavailable``; once it is back the same transport and
subscriptions go on (see ``_transport``).
"""

from nervus.transports.redis._settings import RedisSettings
from nervus.transports.redis._subscription import RedisSubscription
from nervus.transports.redis._transport import RedisTransport

__all__ = ["RedisSettings", "RedisSubscription", "RedisTransport"]
