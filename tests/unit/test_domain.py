"""Aggregates, repositories, snapshots and upcasting on the embedded event store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from nervus import Envelope, Event
from nervus.codecs import Upcasters
from nervus.domain import Aggregate, EventDecoder, Repository, evolve
from nervus.errors import (
    ConcurrencyError,
    ConfigurationError,
    DecodeError,
    DomainError,
    UnknownEventType,
)
from nervus.storage import NO_STREAM, EventStore, Snapshot, store_from_url

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden" / "orders_v1.json"


class ItemAdded(Event, type="test.domain.item-added.v1"):
    cart_id: str
    sku: str
    cents: int


class CartCheckedOut(Event, type="test.domain.checked-out.v1"):
    cart_id: str


class NoteWritten(Event, type="test.domain.note-written.v1"):
    cart_id: str
    text: str


class Cart(Aggregate):
    items: list[str] = msgspec.field(default_factory=list)
    total: int = 0
    checked_out: bool = False

    def add(self, cart_id: str, sku: str, cents: int) -> list[Event]:
        if self.checked_out:
            raise DomainError(f"cart {cart_id} is checked out")
        return [ItemAdded(cart_id=cart_id, sku=sku, cents=cents)]

    def check_out(self, cart_id: str) -> list[Event]:
        if not self.items:
            raise DomainError(f"cart {cart_id} is empty")
        if self.checked_out:
            return []  # nothing to do
        return [CartCheckedOut(cart_id=cart_id)]

    @evolve
    def _added(self, event: ItemAdded) -> None:
        self.items.append(event.sku)
        self.total += event.cents

    @evolve
    def _checked_out(self, event: CartCheckedOut) -> None:
        self.checked_out = True


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    store = store_from_url(f"sqlite:///{tmp_path}/domain.db")
    await store.connect()
    yield store
    await store.close()


async def test_decisions_append_events_that_evolve_the_state(store: EventStore) -> None:
    carts = Repository(store, Cart, source="test")
    first = await carts.execute("c1", lambda cart: cart.add("c1", "book", 1200))
    assert (first.stream_id, first.version) == ("cart-c1", 1)
    assert first.events == (ItemAdded(cart_id="c1", sku="book", cents=1200),)
    await carts.execute("c1", lambda cart: cart.add("c1", "pen", 300))
    done = await carts.execute("c1", lambda cart: cart.check_out("c1"))
    assert done.version == 3
    loaded = await carts.load("c1")
    assert loaded.aggregate == Cart(items=["book", "pen"], total=1500, checked_out=True)
    assert loaded.version == 3
    stored = await store.read_stream("cart-c1")
    assert [e.envelope.source for e in stored] == ["test"] * 3
    assert [e.envelope.partitionkey for e in stored] == ["cart-c1"] * 3
    # no events: nothing appended, the version stays
    again = await carts.execute("c1", lambda cart: cart.check_out("c1"))
    assert (again.version, again.events, again.position) == (3, (), 0)


async def test_a_domain_error_appends_nothing(store: EventStore) -> None:
    carts = Repository(store, Cart)
    with pytest.raises(DomainError, match="cart c2 is empty"):
        await carts.execute("c2", lambda cart: cart.check_out("c2"))
    assert await store.read_stream("cart-c2") == []


async def test_an_async_decision(store: EventStore) -> None:
    carts = Repository(store, Cart)

    async def decide(cart: Cart) -> list[Event]:
        await asyncio.sleep(0)
        return cart.add("c3", "mug", 800)

    assert (await carts.execute("c3", decide)).version == 1


async def test_concurrent_commands_are_retried_on_conflict(store: EventStore) -> None:
    carts = Repository(store, Cart)
    results = await asyncio.gather(
        *[carts.execute("busy", lambda cart, n=n: cart.add("busy", f"sku{n}", n)) for n in range(8)]
    )
    assert sorted(r.version for r in results) == list(range(1, 9))
    cart = (await carts.load("busy")).aggregate
    assert sorted(cart.items) == sorted(f"sku{n}" for n in range(8)) and cart.total == 28


async def test_conflicts_beyond_max_retries_raise(store: EventStore) -> None:
    carts = Repository(store, Cart, max_retries=1)
    other = Repository(store, Cart)
    interfered = 0

    async def decide_while_someone_else_appends(cart: Cart) -> list[Event]:
        nonlocal interfered
        interfered += 1
        await other.execute("hot", lambda c: c.add("hot", "other", 1))
        return cart.add("hot", "mine", 2)

    with pytest.raises(ConcurrencyError) as caught:
        await carts.execute("hot", decide_while_someone_else_appends)
    assert interfered == 2  # the first attempt and one retry
    assert caught.value.stream_id == "cart-hot"
    assert (await carts.load("hot")).aggregate.items == ["other", "other"]


async def test_a_command_delivered_twice_appends_once(store: EventStore) -> None:
    carts = Repository(store, Cart)
    command = Envelope.new(type="test.domain.add-item.v1", source="client", data=b"{}")
    first = await carts.execute(
        "c4", lambda cart: cart.add("c4", "lamp", 4000), cause=command, deduplicate=True
    )
    again = await carts.execute(
        "c4", lambda cart: cart.add("c4", "lamp", 4000), cause=command, deduplicate=True
    )
    assert (first.repeated, again.repeated) == (False, True)
    assert (again.version, again.position) == (first.version, first.position)
    stored = await store.read_stream("cart-c4")
    assert len(stored) == 1
    assert stored[0].envelope.causationid == command.id
    assert stored[0].envelope.correlationid == command.id
    # one cause may lead to several commands on one aggregate: without deduplicate
    third = await carts.execute("c4", lambda cart: cart.add("c4", "bulb", 5), cause=command)
    assert (third.repeated, third.version) == (False, 2)


async def test_snapshots_are_taken_every_n_and_used_on_load(store: EventStore) -> None:
    carts = Repository(store, Cart, snapshot_every=3)
    for n in range(7):
        await carts.execute("s1", lambda cart, n=n: cart.add("s1", f"i{n}", 10))
    snapshot = await store.load_snapshot("cart-s1")
    assert snapshot is not None and snapshot.version == 6
    assert msgspec.json.decode(snapshot.data, type=Cart).items == [f"i{n}" for n in range(6)]
    # the load starts from the snapshot: a (doctored) snapshot shows it was used
    doctored = Cart(items=["from-snapshot"], total=1)
    await store.save_snapshot(Snapshot("cart-s1", 7, snapshot.type, msgspec.json.encode(doctored)))
    loaded = await carts.load("s1")
    assert (loaded.aggregate, loaded.version) == (doctored, 7)
    after = await carts.execute("s1", lambda cart: cart.add("s1", "i7", 10))
    assert after.version == 8
    assert (await carts.load("s1")).aggregate.items == ["from-snapshot", "i7"]
    # without snapshots the stream alone decides
    plain = Repository(store, Cart)
    assert (await plain.load("s1")).aggregate.items == [f"i{n}" for n in range(8)]


async def test_a_snapshot_of_another_shape_is_ignored(store: EventStore) -> None:
    carts = Repository(store, Cart, snapshot_every=2)
    for n in range(2):
        await carts.execute("s2", lambda cart, n=n: cart.add("s2", f"i{n}", 5))

    class CartV2(Cart):
        category = "cart"
        snapshot_version = 2

    loaded = await Repository(store, CartV2, snapshot_every=2).load("s2")
    assert loaded.aggregate.items == ["i0", "i1"]  # read from the events
    await store.save_snapshot(Snapshot("cart-s2", 9, "garbage:1", b"not json"))
    assert (await carts.load("s2")).aggregate.items == ["i0", "i1"]


async def test_an_unknown_stored_type_names_the_type_and_the_stream(store: EventStore) -> None:
    removed = Envelope.new(type="test.domain.removed-long-ago.v1", source="old", data=b"{}")
    await store.append("cart-u1", [removed], NO_STREAM)
    with pytest.raises(UnknownEventType) as caught:
        await Repository(store, Cart).load("u1")
    message = str(caught.value)
    assert "test.domain.removed-long-ago.v1" in message and "'cart-u1' version 1" in message


async def test_a_payload_that_does_not_fit_names_stream_version_and_type(
    store: EventStore,
) -> None:
    bad = Envelope.new(type="test.domain.item-added.v1", source="old", data=b'{"cart_id":"x"}')
    await store.append("cart-u2", [bad], NO_STREAM)
    with pytest.raises(DecodeError) as caught:
        await Repository(store, Cart).load("u2")
    assert (caught.value.stream_id, caught.value.version) == ("cart-u2", 1)
    assert caught.value.event_type == "test.domain.item-added.v1"
    assert "sku" in str(caught.value)


def test_a_misdeclared_evolve_method_is_reported() -> None:
    class Broken(Aggregate):
        count: int = 0

        @evolve
        def no_annotation(self, event) -> None:  # type: ignore[no-untyped-def]
            self.count += 1

    with pytest.raises(ConfigurationError, match="one annotated event"):
        Broken().apply(NoteWritten(cart_id="x", text="y"))


# -- upcasting, against events an earlier release stored --------------------------------


class GoldenPlaced(Event, type="golden.order.placed.v3"):
    order_id: str
    amount_cents: int
    currency: str
    items: list[str]


class GoldenPaid(Event, type="golden.order.paid.v1"):
    order_id: str


def golden_upcasters() -> Upcasters:
    upcasters = Upcasters()

    def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        rest = {k: v for k, v in data.items() if k != "amount"}
        return {**rest, "amount_cents": data["amount"]}

    def v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "currency": "EUR"}

    upcasters.register("golden.order.placed.v1", "golden.order.placed.v2", v1_to_v2)
    upcasters.register("golden.order.placed.v2", "golden.order.placed.v3", v2_to_v3)
    return upcasters


async def load_golden(store: EventStore) -> None:
    for stored in json.loads(GOLDEN.read_text())["events"]:
        envelope = Envelope(
            id=stored["id"],
            type=stored["type"],
            source="shop-2025",
            time=stored["time"],
            data=json.dumps(stored["data"]).encode(),
        )
        await store.append(stored["stream_id"], [envelope], None)


async def test_old_events_are_read_as_current_types_through_chained_upcasters(
    store: EventStore,
) -> None:
    await load_golden(store)
    decoder = EventDecoder(upcasters=golden_upcasters())
    decoded = [decoder.decode(r) for r in await store.read_all()]
    assert decoded == [
        GoldenPlaced(order_id="A1", amount_cents=1999, currency="EUR", items=["book"]),
        GoldenPaid(order_id="A1"),
        GoldenPlaced(order_id="B2", amount_cents=500, currency="EUR", items=["pen", "ink"]),
        GoldenPlaced(order_id="C3", amount_cents=120, currency="USD", items=[]),
    ]
    # stored events are never rewritten
    raw = await store.read_stream("order-A1")
    assert raw[0].envelope.type == "golden.order.placed.v1"
    assert json.loads(raw[0].envelope.data) == {"order_id": "A1", "amount": 1999, "items": ["book"]}
    # without the upcasters the old type is unknown, and the error says where it is
    with pytest.raises(UnknownEventType, match=r"golden\.order\.placed\.v1.*'order-A1' version 1"):
        EventDecoder(upcasters=Upcasters()).decode(raw[0])


async def test_an_upcast_payload_that_does_not_fit_is_a_decode_error(store: EventStore) -> None:
    await load_golden(store)
    upcasters = Upcasters()
    upcasters.register("golden.order.placed.v1", "golden.order.placed.v3", lambda data: data)
    first = (await store.read_stream("order-A1"))[0]
    with pytest.raises(DecodeError) as caught:
        EventDecoder(upcasters=upcasters).decode(first)
    assert caught.value.stream_id == "order-A1"
    assert "upcast from 'golden.order.placed.v1'" in str(caught.value)


def test_upcasters_must_form_chains() -> None:
    upcasters = Upcasters()
    upcasters.register("a.b.c.v1", "a.b.c.v2", lambda d: d)
    with pytest.raises(ConfigurationError, match="two upcasters read"):
        upcasters.register("a.b.c.v1", "a.b.c.v3", lambda d: d)
    upcasters.register("a.b.c.v2", "a.b.c.v3", lambda d: d)
    with pytest.raises(ConfigurationError, match="closes a loop"):
        upcasters.register("a.b.c.v3", "a.b.c.v1", lambda d: d)
    assert upcasters.chain("a.b.c.v1") == ["a.b.c.v1", "a.b.c.v2", "a.b.c.v3"]
