"""The PostgreSQL transport: a durable partitioned log in tables of one schema.

``postgresql://user:password@host:5432/database?schema=nervus&partitions=8`` — see
``PostgresSettings``; libpq's own options (``sslmode``, ``application_name`` ...)
pass through to the connection. Needs ``pip install 'nervus[postgres]'``.
"""

from nervus.transports.postgres._settings import PostgresSettings
from nervus.transports.postgres._subscription import PostgresSubscription
from nervus.transports.postgres._transport import PostgresTransport

__all__ = ["PostgresSettings", "PostgresSubscription", "PostgresTransport"]
