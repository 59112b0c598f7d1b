"""SQLAlchemy sessions in service transactions, on the embedded store (a sync
``Session``) and PostgreSQL (an ``AsyncSession``): the session's writes, the outbox and
the inbox commit together or not at all."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from nervus import Context, Event, Service, Settings
from nervus.errors import ConfigurationError
from nervus.runtime import ServiceTransaction
from nervus.runtime._outgoing import encode
from nervus.transports import OutgoingMessage, from_url

T = TypeVar("T")


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    cents: Mapped[int]
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Transfer(Event, type="sa.money.transfer-requested.v1", key="account"):
    account: str
    cents: int


class Debited(Event, type="sa.money.debited.v1", key="account"):
    account: str
    cents: int


@dataclass
class Database:
    """A fresh store, and a look at it from a connection of its own."""

    transport: str
    store: str
    visible: Callable[[str], Any]  # async: rows of a query, as another connection sees them
    dialect: str


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.unit),
        pytest.param("postgres", marks=[pytest.mark.integration, pytest.mark.postgres]),
    ]
)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    transport = f"memory://{uuid.uuid4().hex}?partitions=4"
    if request.param == "sqlite":
        path = tmp_path / "ledger.db"

        async def visible_sqlite(sql: str) -> list[tuple[Any, ...]]:
            conn = sqlite3.connect(path)
            try:
                return conn.execute(sql.format(ns="")).fetchall()
            finally:
                conn.close()

        yield Database(transport, f"sqlite:///{path}", visible_sqlite, "sqlite")
        return
    postgres_url: str = request.getfixturevalue("postgres_url")
    schema = f"nervus_sa_{uuid.uuid4().hex[:12]}"

    async def visible_postgres(sql: str) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(postgres_url)
        try:
            return [tuple(r) for r in await conn.fetch(sql.format(ns=f"{schema}."))]
        finally:
            await conn.close()

    yield Database(
        transport, f"{postgres_url}?schema={schema}&poll_interval=0.2", visible_postgres, "pg"
    )
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def service(db: Database, name: str = "ledger") -> Service:
    settings = Settings(
        transport=db.transport,
        store=db.store,
        backoff_initial=0.01,
        backoff_max=0.02,
        shutdown_timeout=5,
        publish_timeout=0.2,
        relay=False,  # outbox rows stay where the tests can count them
    )
    return Service(name, settings=settings, outbox=True)


async def orm(tx: ServiceTransaction, work: Callable[[Session], T]) -> T:
    """Run ``work`` with the transaction's session: the sync ``Session`` itself on
    SQLite, the ``AsyncSession``'s sync session (``run_sync``) on PostgreSQL."""
    if tx.dialect == "sqlite":
        return work(tx.sqlalchemy())
    session = await tx.sqlalchemy_async()
    return await session.run_sync(work)


async def create_accounts(ledger: Service) -> None:
    async with ledger.transaction() as tx:

        def create(session: Session) -> None:
            Base.metadata.create_all(session.connection())
            session.add_all([Account(id="a", cents=1000), Account(id="b", cents=1000)])

        await orm(tx, create)


async def balances(ledger: Service) -> dict[str, int]:
    async with ledger.transaction() as tx:
        accounts = await orm(tx, lambda s: s.scalars(select(Account).order_by(Account.id)).all())
    return {a.id: a.cents for a in accounts}


async def test_orm_writes_and_published_events_commit_together(db: Database) -> None:
    ledger = service(db)
    async with ledger:
        await create_accounts(ledger)
        async with ledger.transaction() as tx:

            def debit(session: Session) -> None:
                account = session.get_one(Account, "a")
                account.cents -= 100
                account.tags = {"last": "t1"}
                session.add(Account(id="c", cents=5))

            await orm(tx, debit)
            await tx.publish(Debited(account="a", cents=100))
            assert await db.visible("SELECT count(*) FROM {ns}accounts") == [(2,)]
        assert await balances(ledger) == {"a": 900, "b": 1000, "c": 5}
        (message,) = await ledger.store.outbox_batch()
        assert message.headers["ce_type"] == "sa.money.debited.v1"
        async with ledger.transaction() as tx:
            tags = await orm(tx, lambda s: s.get_one(Account, "a").tags)
        assert tags == {"last": "t1"}


async def test_an_exception_rolls_back_orm_writes_and_published_events(db: Database) -> None:
    ledger = service(db)
    async with ledger:
        await create_accounts(ledger)

        async def fails() -> None:
            async with ledger.transaction() as tx:

                def debit(session: Session) -> None:
                    session.get_one(Account, "b").cents -= 500
                    session.add(Account(id="d", cents=1))
                    session.commit()  # a savepoint, still undone with the transaction
                    session.add(Account(id="e", cents=1))

                await orm(tx, debit)
                await tx.publish(Debited(account="b", cents=500))
                raise RuntimeError("the business rule said no")

        with pytest.raises(RuntimeError):
            await fails()
        assert await balances(ledger) == {"a": 1000, "b": 1000}
        assert await ledger.store.outbox_counts() == (0, 0)


async def test_session_commit_in_the_block_does_not_commit_the_transaction(
    db: Database,
) -> None:
    ledger = service(db)
    async with ledger:
        await create_accounts(ledger)
        async with ledger.transaction() as tx:

            def commits(session: Session) -> None:
                session.add(Account(id="c", cents=1))
                session.commit()
                session.add(Account(id="d", cents=2))
                session.flush()
                session.rollback()  # back to the savepoint of the last commit: d goes
                session.get_one(Account, "a").cents = 1
                session.commit()

            await orm(tx, commits)
            await tx.publish(Debited(account="a", cents=999))
            # another connection sees none of it before the block ends
            assert await db.visible("SELECT id, cents FROM {ns}accounts ORDER BY id") == [
                ("a", 1000),
                ("b", 1000),
            ]
            assert await ledger.store.outbox_counts() == (0, 0)
            ids = await orm(tx, lambda s: s.scalars(select(Account.id)).all())
            assert sorted(ids) == ["a", "b", "c"]
        assert await db.visible("SELECT id, cents FROM {ns}accounts ORDER BY id") == [
            ("a", 1),
            ("b", 1000),
            ("c", 1),
        ]
        assert await ledger.store.outbox_counts() == (1, 0)


async def test_queries_see_the_transactions_own_writes(db: Database) -> None:
    ledger = service(db)
    async with ledger:
        await create_accounts(ledger)
        async with ledger.transaction() as tx:
            await tx.execute(
                f"INSERT INTO {tx.namespace}accounts (id, cents, tags) VALUES ('raw', 7, '{{}}')"
            )

            def reads(session: Session) -> tuple[int, int]:
                raw = session.get_one(Account, "raw").cents
                session.add(Account(id="pending", cents=8))  # found by autoflush
                pending = session.scalars(
                    select(Account.cents).where(Account.id == "pending")
                ).one()
                session.get_one(Account, "a").cents = 3
                session.flush()
                return raw, pending

            assert await orm(tx, reads) == (7, 8)
            rows = await tx.fetch(f"SELECT cents FROM {tx.namespace}accounts WHERE id = 'a'")
            assert rows == [(3,)]
            assert tx.dialect != "sqlite" or tx.sqlalchemy() is tx.sqlalchemy()
            assert tx.dialect == "sqlite" or (
                await tx.sqlalchemy_async() is await tx.sqlalchemy_async()
            )
        assert await balances(ledger) == {"a": 3, "b": 1000, "pending": 8, "raw": 7}


async def test_pending_changes_that_cannot_be_flushed_roll_everything_back(
    db: Database,
) -> None:
    ledger = service(db)
    async with ledger:
        await create_accounts(ledger)

        async def duplicate() -> None:
            async with ledger.transaction() as tx:
                await tx.publish(Debited(account="a", cents=1))
                await tx.execute(f"UPDATE {tx.namespace}accounts SET cents = 0")
                await orm(tx, lambda s: s.add(Account(id="a", cents=1)))  # flushed at the end

        with pytest.raises(IntegrityError):
            await duplicate()
        assert await balances(ledger) == {"a": 1000, "b": 1000}
        assert await ledger.store.outbox_counts() == (0, 0)


async def test_an_inbox_handler_using_the_orm_takes_effect_once(db: Database) -> None:
    ledger = service(db)
    runs = 0

    @ledger.on(Transfer, inbox=True)
    async def debit(event: Transfer, ctx: Context) -> None:
        nonlocal runs
        runs += 1
        async with ctx.transaction() as tx:

            def apply(session: Session) -> None:  # left pending: flushed at the commit
                session.get_one(Account, event.account).cents -= event.cents

            await orm(tx, apply)
            await tx.publish(Debited(account=event.account, cents=event.cents))

    async with ledger:
        await create_accounts(ledger)
        transport = from_url(db.transport)
        await transport.connect()
        channel, message = encode(Transfer(account="a", cents=250), source="x")
        again = OutgoingMessage(message.key, dict(message.headers), message.body)
        await transport.publish(channel, [message, again])  # one message, delivered twice
        await transport.close()
        async with asyncio.timeout(10):
            while ledger.inbox.duplicates < 1:
                await asyncio.sleep(0.01)
        assert await balances(ledger) == {"a": 750, "b": 1000}
        assert await ledger.store.handled("ledger", message.headers["ce_id"])
        (debited,) = await ledger.store.outbox_batch()
    assert runs == 1
    assert debited.headers["ce_causationid"] == message.headers["ce_id"]


async def test_concurrent_transactions_each_get_a_session_on_their_own_connection(
    db: Database,
) -> None:
    ledger = service(db)

    async def transfer(n: int) -> None:
        async with ledger.transaction() as tx:
            await orm(tx, lambda s: s.add(Account(id=f"n{n}", cents=n)))
            await asyncio.sleep(0.01)  # the others run meanwhile (on PostgreSQL)
            await tx.publish(Debited(account=f"n{n}", cents=n))
            seen = await orm(tx, lambda s: s.scalars(select(Account.id)).all())
            assert f"n{n}" in seen
            if n % 2:
                raise RuntimeError(f"transfer {n} refused")

    async with ledger:
        await create_accounts(ledger)
        results = await asyncio.gather(*(transfer(n) for n in range(6)), return_exceptions=True)
        assert [isinstance(r, RuntimeError) for r in results] == [False, True] * 3
        assert await balances(ledger) == {"a": 1000, "b": 1000, "n0": 0, "n2": 2, "n4": 4}
        assert sorted(m.key or "" for m in await ledger.store.outbox_batch()) == [
            "n0",
            "n2",
            "n4",
        ]


async def engine_of(service: Service) -> object:
    async with service.transaction() as tx:
        if tx.dialect == "sqlite":
            return tx.sqlalchemy().get_bind().engine
        session = await tx.sqlalchemy_async()
        return session.bind.engine  # type: ignore[union-attr]


async def test_one_engine_per_store(db: Database) -> None:
    ledger, other = service(db), service(db, "other")
    async with ledger, other:
        first = await engine_of(ledger)
        assert await engine_of(ledger) is first
        assert other.store is not ledger.store
        assert await engine_of(other) is not first


async def test_the_wrong_style_for_the_store_names_the_right_one(db: Database) -> None:
    ledger = service(db)

    async def wrong_style() -> None:
        async with ledger.transaction() as tx:
            if tx.dialect == "sqlite":
                await tx.sqlalchemy_async()
            else:
                tx.sqlalchemy()

    async with ledger:
        with pytest.raises(ConfigurationError) as raised:
            await wrong_style()
    fix = "tx.sqlalchemy()" if db.dialect == "sqlite" else "await tx.sqlalchemy_async()"
    assert fix in str(raised.value)


@pytest.mark.parametrize(
    "db",
    [pytest.param("postgres", marks=[pytest.mark.integration, pytest.mark.postgres])],
    indirect=True,
)
async def test_the_native_async_style_on_postgresql(db: Database) -> None:
    """The AsyncSession's own methods; tables without a schema are the store's, a table
    with one is where its metadata says; the session leaves no codec on the pooled
    connection (``tx.fetch`` gets JSON as text, as it always does)."""
    other = f"nervus_sa_other_{uuid.uuid4().hex[:8]}"
    notes = Table(
        "notes",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("text", String(80)),
        schema=other,
    )
    ledger = service(db)
    try:
        async with ledger:
            await create_accounts(ledger)
            async with ledger.transaction() as tx:
                await tx.execute(f"CREATE SCHEMA {other}")
                session = await tx.sqlalchemy_async()
                await (await session.connection()).run_sync(notes.metadata.create_all)
                await session.execute(insert(notes).values(id=1, text="elsewhere"))
                account = await session.get_one(Account, "a")
                account.tags = {"k": [1, 2]}
                await session.commit()
                account.cents = 10
                await session.flush()
                await session.rollback()
                assert (await session.get_one(Account, "a")).cents == 1000
                session.add(Account(id="z", cents=26))
                await tx.publish(Debited(account="z", cents=26))
                assert await tx.fetch(f"SELECT text FROM {other}.notes") == [("elsewhere",)]
            assert await db.visible("SELECT id FROM {ns}accounts ORDER BY id") == [
                ("a",),
                ("b",),
                ("z",),
            ]
            for _ in range(3):  # the pool's connections, each used by a session above
                async with ledger.transaction() as tx:
                    rows = await tx.fetch(
                        f"SELECT tags FROM {tx.namespace}accounts WHERE id = ?", "a"
                    )
                    assert rows == [('{"k": [1, 2]}',)]
            assert await ledger.store.outbox_counts() == (1, 0)
    finally:
        conn = await asyncpg.connect(db.store.split("?")[0])
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {other} CASCADE")
        finally:
            await conn.close()


async def test_without_sqlalchemy_the_error_names_the_extra(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "nervus.runtime._sqlalchemy", None)  # cannot be imported
    ledger = service(db)

    async def needs_sqlalchemy() -> None:
        async with ledger.transaction() as tx:
            if tx.dialect == "sqlite":
                tx.sqlalchemy()
            else:
                await tx.sqlalchemy_async()

    async with ledger:
        with pytest.raises(ConfigurationError, match=r"pip install 'nervus\[sqlalchemy\]'"):
            await needs_sqlalchemy()
