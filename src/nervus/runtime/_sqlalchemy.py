"""SQLAlchemy sessions inside a service transaction (``tx.sqlalchemy()`` on SQLite,
``await tx.sqlalchemy_async()`` on PostgreSQL).

The session's statements run on the transaction's own connection, so its writes
commit with the transaction's outbox rows and inbox record, or not at all. nervus
began that transaction and ends it: SQLAlchemy must never commit, roll back or close
it, and several of its habits would (setting ``isolation_level`` on a sqlite3
connection commits an open transaction; a pool rolls back a connection given back;
``Connection.close()`` and the check after the first connect roll back).

Engines
    One per store, built on first use and kept as long as the store (the compiled
    statement cache it holds is most of what keeps a session cheap). Its dialect is
    SQLAlchemy's own (pysqlite, asyncpg) with the root transaction's begin, commit and
    rollback, and the closing of the connection, made no-ops: whatever SQLAlchemy
    does, only statements and savepoints reach the database.

    - SQLite: the pool holds the store's transaction connection (one per store, in
      sqlite3's autocommit mode, the transaction begun with ``BEGIN IMMEDIATE``).
      SQLAlchemy's async style (aiosqlite) opens connections of its own and cannot
      share it.
    - PostgreSQL: each connect wraps the asyncpg connection of the transaction asking
      (``async_creator``, ``NullPool``) with SQLAlchemy's adapter set to autocommit, so
      it opens no transaction of its own. No type codecs are set on the connection
      (they would stay on the pooled connection and change what ``tx.fetch`` returns
      there): SQLAlchemy decodes JSON itself. Tables without a schema go to the store's
      (``schema_translate_map``); a table's own schema is kept.

Sessions
    A transaction has at most one session, joined with
    ``join_transaction_mode="create_savepoint"``: ``session.commit()`` releases a
    savepoint, ``session.rollback()`` rolls back to one (undoing the session's writes
    since its last commit, nothing else). When the block ends the session is committed
    (flushing what is pending) and closed before nervus commits; when it raised, the
    session is invalidated without a statement, since the whole transaction rolls back.
    ``expire_on_commit=False``: objects stay readable after a commit and after the
    block (no implicit reload, which the async style could not do anyway).
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import postgresql, registry
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.util import await_only

from nervus.errors import ConfigurationError
from nervus.storage import EventStore, StoreTransaction


class _InTransaction:
    """What the dialects below share: the transaction and its connection are nervus's,
    and savepoints go to the driver as they are (SQLAlchemy compiles its savepoint
    statements anew each time, and the asyncpg adapter prepares each before running
    it: three quarters of a session's own cost on SQLite, two round trips on
    PostgreSQL)."""

    supports_statement_cache = True

    def _run(self, connection: Connection, sql: str) -> None:
        raise NotImplementedError

    def _name(self, name: str) -> str:
        quote: Callable[[str], str] = self.identifier_preparer.quote  # type: ignore[attr-defined]
        return quote(name)

    def do_savepoint(self, connection: Connection, name: str) -> None:
        self._run(connection, f"SAVEPOINT {self._name(name)}")

    def do_release_savepoint(self, connection: Connection, name: str) -> None:
        self._run(connection, f"RELEASE SAVEPOINT {self._name(name)}")

    def do_rollback_to_savepoint(self, connection: Connection, name: str) -> None:
        self._run(connection, f"ROLLBACK TO SAVEPOINT {self._name(name)}")

    def do_begin(self, dbapi_connection: Any) -> None:
        pass

    def do_commit(self, dbapi_connection: Any) -> None:
        pass

    def do_rollback(self, dbapi_connection: Any) -> None:
        pass

    def do_close(self, dbapi_connection: Any) -> None:
        pass

    def do_terminate(self, dbapi_connection: Any) -> None:
        pass


class SqliteInTransaction(_InTransaction, SQLiteDialect_pysqlite):
    """pysqlite on the store's transaction connection. ``set_isolation_level`` is never
    called: no ``isolation_level`` is given to the engine."""

    supports_statement_cache = True

    def _run(self, connection: Connection, sql: str) -> None:
        connection.connection.driver_connection.execute(sql)  # type: ignore[union-attr]


class PostgresInTransaction(_InTransaction, PGDialect_asyncpg):
    """asyncpg on the transaction's connection, without the JSON codecs SQLAlchemy
    would set on it: JSON is decoded by SQLAlchemy's own JSON types instead (the flag
    for SQLAlchemy 2.1, the column types for 2.0)."""

    supports_statement_cache = True
    supports_native_json_deserialization = False
    colspecs = {**PGDialect_asyncpg.colspecs, sqltypes.JSON: postgresql.JSON, JSONB: JSONB}

    def on_connect(self) -> None:
        return None

    def _run(self, connection: Connection, sql: str) -> None:
        await_only(connection.connection.driver_connection.execute(sql))  # type: ignore[union-attr]


_DRIVER = "nervus_transaction"
registry.register(f"sqlite.{_DRIVER}", __name__, "SqliteInTransaction")
registry.register(f"postgresql.{_DRIVER}", __name__, "PostgresInTransaction")

# the asyncpg connection of the transaction connecting (read by the engine's creator)
_CONNECTION: contextvars.ContextVar[Any] = contextvars.ContextVar("nervus_sqlalchemy_connection")

_sqlite_engines: weakref.WeakKeyDictionary[EventStore, tuple[Any, Engine]] = (
    weakref.WeakKeyDictionary()
)
_postgres_engines: weakref.WeakKeyDictionary[EventStore, AsyncEngine] = weakref.WeakKeyDictionary()


def _connection_of(tx: StoreTransaction) -> Any:
    connection = getattr(tx, "connection", None)
    if connection is None:
        raise ConfigurationError(
            [f"store: {type(tx).__name__} does not give its connection to SQLAlchemy"]
        )
    return connection


def _sqlite_engine(store: EventStore, raw: Any) -> Engine:
    cached = _sqlite_engines.get(store)
    if cached is not None and cached[0] is raw:
        return cached[1]
    engine = create_engine(
        f"sqlite+{_DRIVER}://",
        creator=lambda: raw,
        poolclass=StaticPool,
        pool_reset_on_return=None,
    )
    _sqlite_engines[store] = (raw, engine)
    return engine


async def _transaction_connection() -> Any:
    return _CONNECTION.get()


def _postgres_engine(store: EventStore, schema: str) -> AsyncEngine:
    engine = _postgres_engines.get(store)
    if engine is None:
        engine = _postgres_engines[store] = create_async_engine(
            f"postgresql+{_DRIVER}://",
            async_creator=_transaction_connection,
            poolclass=NullPool,
            pool_reset_on_return=None,
            isolation_level="AUTOCOMMIT",
            execution_options={"schema_translate_map": {None: schema}},
        )
    return engine


class SessionOfTransaction:
    """The SQLAlchemy ``Session`` of one SQLite transaction, and how it ends."""

    def __init__(self, store: EventStore, tx: StoreTransaction) -> None:
        if tx.dialect != "sqlite":
            raise ConfigurationError(
                [
                    f"store: a {tx.dialect} transaction runs on an async driver, which "
                    "SQLAlchemy drives only in its async style: use "
                    "`await tx.sqlalchemy_async()` (an AsyncSession)"
                ]
            )
        engine = _sqlite_engine(store, _connection_of(tx))
        self.connection: Connection = engine.connect()
        try:
            self.connection.begin()  # nervus's transaction, as SQLAlchemy sees it
            self.session = Session(
                bind=self.connection,
                join_transaction_mode="create_savepoint",
                expire_on_commit=False,
            )
        except BaseException:
            self.connection.close()
            raise

    async def end(self, failed: bool) -> None:
        """Before nervus commits (``failed`` False): flush, release the savepoint, close;
        before it rolls back: let go without a statement."""
        _end(self.connection, self.session, failed)


class AsyncSessionOfTransaction:
    """The SQLAlchemy ``AsyncSession`` of one PostgreSQL transaction, and how it ends."""

    def __init__(self, connection: AsyncConnection, session: AsyncSession) -> None:
        self.connection = connection
        self.session = session

    @classmethod
    async def open(cls, store: EventStore, tx: StoreTransaction) -> AsyncSessionOfTransaction:
        if tx.dialect != "postgresql":
            raise ConfigurationError(
                [
                    f"store: a {tx.dialect} transaction holds a sqlite3 connection, which "
                    "SQLAlchemy's async style (aiosqlite) cannot share: use "
                    "`tx.sqlalchemy()` (a Session)"
                ]
            )
        engine = _postgres_engine(store, tx.namespace.removesuffix("."))
        token = _CONNECTION.set(_connection_of(tx))
        try:
            connection = await engine.connect()
        finally:
            _CONNECTION.reset(token)
        try:
            await connection.begin()  # nervus's transaction, as SQLAlchemy sees it
            session = AsyncSession(
                bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
            )
        except BaseException:
            await connection.close()
            raise
        return cls(connection, session)

    async def end(self, failed: bool) -> None:
        """As ``SessionOfTransaction.end`` (in one switch to SQLAlchemy's greenlet)."""
        await self.connection.run_sync(_end, self.session.sync_session, failed)


def _end(connection: Connection, session: Session, failed: bool) -> None:
    try:
        if not failed:
            if _unfinished(session):
                session.commit()
            session.close()
    except BaseException:
        failed = True
        raise
    finally:
        if failed:
            session.invalidate()
        connection.close()


def _unfinished(session: Session) -> bool:
    """Whether the session has a savepoint open or changes to flush."""
    return bool(session.in_transaction() or session.new or session.dirty or session.deleted)
