"""Event sourcing in a service: commands in process and through the transport,
the relay publishing the store's log, projections running with the service."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from nervus import Command, Context, Event, Service, Settings
from nervus.domain import Aggregate, Projection, ReadModelTransaction, evolve, handles
from nervus.errors import ConfigurationError, DomainError
from nervus.runtime._relay import Relay
from nervus.transports import Delivery, OutgoingMessage, dead_letter_channel, from_url

pytestmark = pytest.mark.unit


class OpenAccount(Command, type="es.account.open.v1", key="account_id"):
    account_id: str
    owner: str


class Deposit(Command, type="es.account.deposit.v1", key="account_id"):
    account_id: str
    cents: int


class AccountOpened(Event, type="es.account.opened.v1", key="account_id"):
    account_id: str
    owner: str


class Deposited(Event, type="es.account.deposited.v1", key="account_id"):
    account_id: str
    cents: int


class Account(Aggregate):
    category = "account"
    owner: str = ""
    balance: int = 0

    @evolve
    def _opened(self, event: AccountOpened) -> None:
        self.owner = event.owner

    @evolve
    def _deposited(self, event: Deposited) -> None:
        self.balance += event.cents


class Balances(Projection):
    name = "balances"
    tables = {"balances": "CREATE TABLE {balances} (id TEXT PRIMARY KEY, cents INTEGER)"}

    @handles
    async def opened(self, event: AccountOpened, tx: ReadModelTransaction) -> None:
        await tx.execute("INSERT INTO {balances} VALUES (?, 0)", event.account_id)

    @handles
    async def deposited(self, event: Deposited, tx: ReadModelTransaction) -> None:
        await tx.execute(
            "UPDATE {balances} SET cents = cents + ? WHERE id = ?", event.cents, event.account_id
        )


def bank(url: str, store: str) -> Service:
    service = Service(
        "bank",
        settings=Settings(
            transport=url, store=store, backoff_initial=0.01, backoff_max=0.02, shutdown_timeout=5
        ),
    )

    @service.command(OpenAccount, aggregate=Account)
    def open_account(account: Account, command: OpenAccount) -> list[Event]:
        if account.owner:
            raise DomainError(f"account {command.account_id} is already open")
        return [AccountOpened(account_id=command.account_id, owner=command.owner)]

    @service.command(Deposit, aggregate=Account)
    async def deposit(account: Account, command: Deposit) -> list[Event]:
        if not account.owner:
            raise DomainError(f"account {command.account_id} is not open")
        return [Deposited(account_id=command.account_id, cents=command.cents)]

    service.projection(Balances())
    return service


async def wait_for(predicate: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.01)


async def read(url: str, channel: str, expected: int) -> list[Delivery]:
    transport = from_url(url)
    await transport.connect()
    got: list[Delivery] = []
    try:
        sub = await transport.subscribe([channel], f"reader-{uuid.uuid4().hex[:8]}")
        async with asyncio.timeout(10):
            while len(got) < expected:
                got.extend(await sub.fetch(1000, 0.05))
        got.extend(await sub.fetch(1000, 0.1))
    finally:
        await transport.close()
    return got


@pytest.fixture
def urls(tmp_path: Path) -> tuple[str, str]:
    return f"memory://{uuid.uuid4().hex}?partitions=4", f"sqlite:///{tmp_path}/bank.db"


async def test_commands_in_process_append_and_the_relay_publishes(
    urls: tuple[str, str],
) -> None:
    url, store = urls
    service = bank(url, store)
    async with service:
        opened = await service.execute(OpenAccount(account_id="a1", owner="ada"))
        assert (opened.stream_id, opened.version) == ("account-a1", 1)
        deposited = await service.execute(Deposit(account_id="a1", cents=250))
        assert deposited.version == 2
        with pytest.raises(DomainError, match="already open"):
            await service.execute(OpenAccount(account_id="a1", owner="bob"))
        with pytest.raises(DomainError, match="not open"):
            await service.execute(Deposit(account_id="a2", cents=1))
        relay = service.relay
        assert isinstance(relay, Relay)
        await wait_for(lambda: relay.published >= 2)
        stored = await service.store.read_all()
    published = await read(url, "es.account", 2)
    assert [d.headers["ce_id"] for d in published] == [e.id for e in stored]
    assert {d.key for d in published} == {"account-a1"}
    assert [d.headers["ce_type"] for d in published] == [
        "es.account.opened.v1",
        "es.account.deposited.v1",
    ]


async def test_commands_through_the_transport_and_a_refusal_dead_lettered(
    urls: tuple[str, str],
) -> None:
    url, store = urls
    service = bank(url, store)
    client = Service("client", settings=Settings(transport=url, store=store))
    async with service:
        await client.publish(OpenAccount(account_id="t1", owner="grace"))
        await client.publish(Deposit(account_id="t1", cents=40))
        await client.publish(Deposit(account_id="nobody", cents=5))
        repo = service.repository(Account)
        async with asyncio.timeout(10):
            while (await repo.load("t1")).version < 2:
                await asyncio.sleep(0.02)
        assert (await repo.load("t1")).aggregate == Account(owner="grace", balance=40)
    await client.stop()
    (dead,) = await read(url, dead_letter_channel("es.account", "bank.commands"), 1)
    assert dead.headers["ce_type"] == "es.account.deposit.v1"
    assert "account nobody is not open" in dead.headers["nervus_dlq_message"]
    assert dead.headers["nervus_dlq_attempts"] == "1"  # not retried: the rules say no


async def test_a_redelivered_command_is_executed_once(urls: tuple[str, str]) -> None:
    url, store = urls
    service = bank(url, store)
    async with service:
        await service.execute(OpenAccount(account_id="r1", owner="lin"))
        transport = from_url(url)
        await transport.connect()
        command = Deposit(account_id="r1", cents=7)
        from nervus.runtime._outgoing import encode

        channel, message = encode(command, source="test")
        twice = [message, OutgoingMessage(message.key, dict(message.headers), message.body)]
        await transport.publish(channel, twice)  # the same command (same id) twice
        await transport.close()
        repo = service.repository(Account)
        await asyncio.sleep(0.5)
        async with asyncio.timeout(10):
            while (await repo.load("r1")).version < 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        loaded = await repo.load("r1")
    assert (loaded.version, loaded.aggregate.balance) == (2, 7)


async def test_the_projection_runs_with_the_service(urls: tuple[str, str]) -> None:
    url, store = urls
    service = bank(url, store)
    async with service:
        for n in range(5):
            await service.execute(OpenAccount(account_id=f"p{n}", owner="x"))
            await service.execute(Deposit(account_id=f"p{n}", cents=n * 10))
        (runner,) = service._sourcing.projections
        async with asyncio.timeout(10):
            while (await runner.status()).lag:
                await asyncio.sleep(0.02)
        async with service.store.transaction() as tx:
            rows = await tx.fetch("SELECT id, cents FROM balances ORDER BY id")
        assert rows == [(f"p{n}", n * 10) for n in range(5)]
        assert service.health().healthy


def test_a_command_needs_a_key_naming_the_aggregate() -> None:
    class Keyless(Command, type="es.account.keyless.v1"):
        account_id: str

    service = Service("bank", settings=Settings())
    with pytest.raises(ConfigurationError, match="key="):
        service.command(Keyless, aggregate=Account)


async def test_an_unknown_command_is_refused(urls: tuple[str, str]) -> None:
    url, store = urls
    service = Service("empty", settings=Settings(transport=url, store=store))

    class Other(Command, type="es.other.thing.v1", key="id"):
        id: str

    with pytest.raises(ConfigurationError, match="no handler for command"):
        await service.execute(Other(id="1"))


async def test_an_event_sourced_handler_can_execute_commands(urls: tuple[str, str]) -> None:
    url, store = urls
    service = bank(url, store)

    @service.on(AccountOpened, group="welcome")
    async def welcome(event: AccountOpened, ctx: Context) -> None:
        await service.execute(Deposit(account_id=event.account_id, cents=100))

    async with service:
        await service.execute(OpenAccount(account_id="w1", owner="mo"))
        repo = service.repository(Account)
        async with asyncio.timeout(10):
            while (await repo.load("w1")).version < 2:
                await asyncio.sleep(0.02)
        stored = await service.store.read_stream("account-w1")
    assert stored[1].envelope.causationid is not None
    assert stored[1].envelope.correlationid == stored[0].envelope.correlationid
