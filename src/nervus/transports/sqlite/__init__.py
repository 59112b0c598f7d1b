"""The embedded default transport: a durable partitioned log in one SQLite file.

``sqlite:///path/to/nervus.db?partitions=8&synchronous=full`` — see ``SqliteSettings``.
"""

from nervus.transports.sqlite._settings import SqliteSettings
from nervus.transports.sqlite._subscription import SqliteSubscription
from nervus.transports.sqlite._transport import SqliteTransport

__all__ = ["SqliteSettings", "SqliteSubscription", "SqliteTransport"]
