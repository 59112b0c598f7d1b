"""The code in the README runs, and does what the README says it does."""

from __future__ import annotations

import asyncio
import re
import types
import uuid
from pathlib import Path

import pytest

from nervus import Envelope, Service, Settings
from nervus.codecs import JSON_CODEC
from nervus.errors import DomainError
from nervus.runtime._outgoing import encode
from nervus.transports import Delivery, from_url

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_opens_with_the_two_commands() -> None:
    text = README.read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, flags=re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.MULTILINE)
    assert re.search(r"^test:", makefile, flags=re.MULTILINE)


async def test_the_service_example_handles_an_event_and_publishes_its_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"memory://readme-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("NERVUS_TRANSPORT", url)
    block = python_blocks(README.read_text())[0]
    module = types.ModuleType("readme_example")
    exec(compile(block, str(README), "exec"), module.__dict__)
    payments: Service = module.payments
    order_placed, payment_captured = module.OrderPlaced, module.PaymentCaptured

    storefront = Service("storefront", settings=Settings(transport=url))
    watcher = from_url(url)
    async with watcher, storefront, payments:
        answers = await watcher.subscribe(["store.payment"], "readme-watcher")
        await storefront.publish(order_placed(order_id="o-1", amount_cents=1200))
        async with asyncio.timeout(10):
            got = []
            while not got:
                got = list(await answers.fetch(10, 0.2))
        headers = got[0].headers
        envelope = Envelope.from_headers(headers, got[0].body)
        assert envelope.type == "store.payment.captured.v1"
        assert JSON_CODEC.decode(envelope.data, payment_captured) == payment_captured(
            order_id="o-1"
        )
        assert envelope.causationid is not None
        assert envelope.correlationid == envelope.causationid, "caused by the first event"
        await answers.ack(got)


async def test_the_event_sourced_example_decides_appends_relays_and_projects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"memory://readme-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("NERVUS_TRANSPORT", url)
    monkeypatch.setenv("NERVUS_STORE", f"sqlite:///{tmp_path}/bank.db")
    block = python_blocks(README.read_text())[1]
    module = types.ModuleType("readme_bank")
    exec(compile(block, str(README), "exec"), module.__dict__)
    bank: Service = module.bank
    watcher = from_url(url)
    async with watcher, bank:
        published = await watcher.subscribe(["bank.account"], "readme-watcher")
        result = await bank.execute(module.OpenAccount(account_id="a-1", owner="ada"))
        assert (result.stream_id, result.version) == ("account-a-1", 1)
        with pytest.raises(DomainError, match="already open"):
            await bank.execute(module.OpenAccount(account_id="a-1", owner="bob"))
        async with asyncio.timeout(10):
            got = []
            while not got:
                got = list(await published.fetch(10, 0.2))
            rows: list[tuple[object, ...]] = []
            while not rows:
                async with bank.store.transaction() as tx:
                    rows = await tx.fetch("SELECT account_id, owner FROM owners")
                await asyncio.sleep(0.02)
    assert got[0].key == "account-a-1"
    assert got[0].headers["ce_type"] == "bank.account.opened.v1"
    assert rows == [("a-1", "ada")]


async def test_the_outbox_example_writes_publishes_and_suppresses_a_redelivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"memory://readme-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("NERVUS_TRANSPORT", url)
    monkeypatch.setenv("NERVUS_STORE", f"sqlite:///{tmp_path}/payments.db")
    block = python_blocks(README.read_text())[2]
    module = types.ModuleType("readme_payments")
    exec(compile(block, str(README), "exec"), module.__dict__)
    payments: Service = module.payments
    watcher = from_url(url)
    async with watcher, payments:
        async with payments.transaction() as tx:
            await tx.execute("CREATE TABLE payments (order_id TEXT PRIMARY KEY, cents INTEGER)")
        captured = await watcher.subscribe(["shop.payment"], "readme-watcher")
        channel, message = encode(module.PaymentRequested(order_id="o-1", cents=900), source="t")
        await watcher.publish(channel, [message, message])  # delivered twice
        async with asyncio.timeout(10):
            got: list[Delivery] = []
            while not any(d.headers["ce_type"] == "shop.payment.captured.v1" for d in got):
                got += await captured.fetch(10, 0.2)
            while payments.inbox.duplicates < 1:
                await asyncio.sleep(0.02)
        async with payments.transaction() as tx:
            rows = await tx.fetch("SELECT order_id, cents FROM payments")
    assert rows == [("o-1", 900)]
