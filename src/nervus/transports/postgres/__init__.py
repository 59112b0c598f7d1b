"""The PostgreSQL transport: a durable partitioned log in tables of one schema.

``postgresql://user:password@host:5432/database?schema=nervus&partitions=8`` — see
``PostgresSettings``; libpq's own options (``sslmode``, ``application_name`` ...)
pass through to the connection. Needs ``pip install 'nervus[postgres]'``.

When the server goes away
    Every operation reconnects on its own; nothing needs reopening. While the
    server is unreachable:

    - ``publish`` raises ``TransportUnavailable`` (retryable; its message names the
      URL without the password and the driver's error). It does not retry by
      itself: it fails as soon as the connection is found broken, or after at most
      ``connect_timeout`` seconds trying to reconnect. A ``Service`` retries it with
      backoff up to its ``publish_timeout``. A publish that failed may or may not
      have been committed (at least once: consumers deduplicate by ``ce_id``).
    - ``fetch`` raises ``TransportUnavailable`` within the same bound (the
      runtime's consumers retry it with backoff), or returns nothing once the
      member's lease is older than ``lease_seconds`` (the partitions may have moved).
      ``ack`` only records positions; their commit is retried with backoff (up to
      two seconds apart) and lands once the server answers, and so do nacks' and
      dead-letters' writes when retried. Lease renewals are retried every heartbeat
      (at most a second apart).
    - the transport logs one warning per outage (logger
      ``nervus.transports.postgres``) naming the URL and the error, and one when
      the server answers again; the failed calls in between log at debug level.

    When the server is back, publishing works again, and each subscription renews
    its lease: partitions it still owns are read on from where it was; partitions
    whose lease ran out meanwhile are taken again from their committed positions,
    so messages fetched but not committed before the outage are delivered again.
    Positions committed before the outage are never lost (a fast or smart server
    shutdown flushes them; after a server crash see ``durable_positions``).

    A peer that vanishes without closing the TCP connection is noticed by the
    kernel's keepalives; tighten them with libpq's options in the URL
    (``keepalives_idle=10&tcp_user_timeout=10000``).
"""

from nervus.transports.postgres._settings import PostgresSettings
from nervus.transports.postgres._subscription import PostgresSubscription
from nervus.transports.postgres._transport import PostgresTransport

__all__ = ["PostgresSettings", "PostgresSubscription", "PostgresTransport"]
