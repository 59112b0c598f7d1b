"""The runtime on the in-memory transport: publishing, handling, context, decoding,
dead-letters, skipping, configuration errors."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from nervus import Context, Event, Service, Settings
from nervus.core import Envelope
from nervus.errors import ConfigurationError, TransportUnavailable
from nervus.runtime import current_context
from nervus.transports import (
    Delivery,
    OutgoingMessage,
    Transport,
    dead_letter_channel,
    from_url,
)
from nervus.transports.memory import MemoryTransport

pytestmark = pytest.mark.unit


class OrderPlaced(Event, type="rt.order.placed.v1", key="order_id"):
    order_id: str
    amount_cents: int


class OrderCancelled(Event, type="rt.order.cancelled.v1", key="order_id"):
    order_id: str


class PaymentCaptured(Event, type="rt.payment.captured.v1", key="order_id"):
    order_id: str


class AuditNoted(Event, type="rt.audit.noted.v1"):
    text: str


def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}?partitions=4"


def settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "transport": url,
        "backoff_initial": 0.01,
        "backoff_max": 0.02,
        "backoff_jitter": 0.0,
        "shutdown_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


async def read_all(url: str, channel: str, expected: int, within: float = 5.0) -> list[Delivery]:
    """Everything on ``channel``, read by a fresh group, waiting until ``expected`` arrived."""
    transport = from_url(url)
    await transport.connect()
    got: list[Delivery] = []
    try:
        sub = await transport.subscribe([channel], f"reader-{uuid.uuid4().hex[:8]}")
        async with asyncio.timeout(within):
            while len(got) < expected:
                got.extend(await sub.fetch(1000, 0.05))
        extra = await sub.fetch(1000, 0.05)
        got.extend(extra)
        await sub.ack(got)
    finally:
        await transport.close()
    return got


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll state that other tasks change, failing after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_handles_published_events_and_publishes_in_the_same_conversation() -> None:
    url = memory_url()
    shop = Service("payments", settings=settings(url))
    seen: list[tuple[OrderPlaced, Envelope]] = []
    captured: list[Envelope] = []

    @shop.on(OrderPlaced)
    async def capture(event: OrderPlaced, ctx: Context) -> None:
        seen.append((event, ctx.envelope))
        await ctx.publish(PaymentCaptured(order_id=event.order_id), subject="cards")

    @shop.on(PaymentCaptured, group="audit")
    async def audit(event: PaymentCaptured, ctx: Context) -> None:
        captured.append(ctx.envelope)

    async with shop:
        await shop.publish(OrderPlaced(order_id="o-1", amount_cents=250))
        await wait_for(lambda: len(captured) == 1)

    (event, placed), (paid,) = seen[0], captured
    assert event == OrderPlaced(order_id="o-1", amount_cents=250)
    assert placed.type == "rt.order.placed.v1"
    assert placed.source == "/nervus/payments"
    assert placed.partitionkey == "o-1"
    assert placed.correlationid == placed.id
    assert placed.causationid is None
    assert paid.type == "rt.payment.captured.v1"
    assert paid.correlationid == placed.id
    assert paid.causationid == placed.id
    assert paid.subject == "cards"
    assert paid.partitionkey == "o-1"
    assert [r.group for r in shop.registrations] == ["audit", "payments"]


async def test_explicit_key_and_keyless_events() -> None:
    url = memory_url()
    shop = Service("shop", settings=settings(url))
    await shop.publish(OrderPlaced(order_id="o-1", amount_cents=1), key="customer-9")
    await shop.publish(AuditNoted(text="hello"))
    await shop.stop()
    (order,) = await read_all(url, "rt.order", 1)
    assert order.key == "customer-9"
    assert order.headers["ce_partitionkey"] == "customer-9"
    (note,) = await read_all(url, "rt.audit", 1)
    assert note.key is None
    assert "ce_partitionkey" not in note.headers


class CountingTransport(MemoryTransport):
    """The in-memory transport, recording each publish call."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls: list[tuple[str, int]] = []

    async def publish(self, channel: str, messages: Sequence[OutgoingMessage]) -> None:
        self.calls.append((channel, len(messages)))
        await super().publish(channel, messages)


async def test_publish_many_makes_one_call_per_channel_in_order() -> None:
    transport = CountingTransport(uuid.uuid4().hex)
    shop = Service("shop", settings=settings("memory://unused"), transport=transport)
    events: list[Event] = [OrderPlaced(order_id=f"o-{i}", amount_cents=i) for i in range(5)]
    events.insert(2, AuditNoted(text="a"))
    events.append(AuditNoted(text="b"))
    await shop.publish_many(events)
    assert transport.calls == [("rt.order", 5), ("rt.audit", 2)]
    await shop.stop()


async def test_staged_publishes_go_out_once_per_channel_after_success() -> None:
    transport = CountingTransport(uuid.uuid4().hex)
    shop = Service("shop", settings=settings("memory://unused"), transport=transport)
    runs = 0

    @shop.on(OrderPlaced)
    async def fan_out(event: OrderPlaced, ctx: Context) -> None:
        nonlocal runs
        runs += 1
        await ctx.publish(PaymentCaptured(order_id=event.order_id))
        await ctx.publish(AuditNoted(text="one"))
        await ctx.publish(PaymentCaptured(order_id=event.order_id + "-again"))
        if runs == 1:
            raise RuntimeError("first run fails after staging")

    async with shop:
        await shop.publish(OrderPlaced(order_id="o-1", amount_cents=1))
        await wait_for(lambda: len(transport.calls) == 3)
        await asyncio.sleep(0.05)
    assert runs == 2
    # the failed run published nothing; the good one made one call per channel
    assert transport.calls == [("rt.order", 1), ("rt.payment", 2), ("rt.audit", 1)]


async def test_service_publish_inside_a_handler_joins_the_conversation() -> None:
    url = memory_url()
    shop = Service("shop", settings=settings(url))
    outside: list[object] = [current_context()]

    @shop.on(OrderPlaced)
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        assert current_context() is ctx
        await shop.publish(AuditNoted(text=event.order_id))

    async with shop:
        await shop.publish(OrderPlaced(order_id="o-7", amount_cents=1))
        (note,) = await read_all(url, "rt.audit", 1)
    (order,) = await read_all(url, "rt.order", 1)
    assert outside == [None]
    assert note.headers["ce_correlationid"] == order.headers["ce_id"]
    assert note.headers["ce_causationid"] == order.headers["ce_id"]


async def test_context_carries_delivery_info_and_a_logger_with_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = memory_url()
    shop = Service("shop", settings=settings(url))
    infos = []

    @shop.on(OrderPlaced, group="billing")
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        infos.append(ctx.delivery)
        ctx.logger.info("handling %s", event.order_id, extra={"custom": 1})

    caplog.set_level(logging.INFO)
    async with shop:
        await shop.publish(OrderPlaced(order_id="o-3", amount_cents=1))
        await wait_for(lambda: len(infos) == 1)
    (info,) = infos
    assert (info.group, info.channel, info.offset, info.attempt, info.key) == (
        "billing",
        "rt.order",
        0,
        1,
        "o-3",
    )
    assert 0 <= info.partition < 4
    (record,) = [r for r in caplog.records if r.getMessage() == "handling o-3"]
    assert record.name == __name__
    assert record.nervus_service == "shop"  # type: ignore[attr-defined]
    assert record.nervus_type == "rt.order.placed.v1"  # type: ignore[attr-defined]
    assert record.nervus_correlation_id == record.nervus_id  # type: ignore[attr-defined]
    assert record.custom == 1  # type: ignore[attr-defined]


async def test_undecodable_and_unknown_messages_are_dead_lettered_at_once() -> None:
    url = memory_url()
    shop = Service("shop", settings=settings(url, max_attempts=5))
    handled: list[str] = []

    @shop.on(OrderPlaced)
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        handled.append(event.order_id)

    good = Envelope.new(type="rt.order.placed.v1", source="/test", data=b"").to_headers()
    unknown = Envelope.new(type="rt.order.shipped.v9", source="/test", data=b"").to_headers()
    no_id = {k: v for k, v in good.items() if k != "ce_id"}
    bad_messages = [
        OutgoingMessage(key="k", headers=good, body=b"{not json"),
        OutgoingMessage(key="k", headers=good, body=b'{"order_id": 5}'),
        OutgoingMessage(key="k", headers=unknown, body=b"{}"),
        OutgoingMessage(key="k", headers=no_id, body=b"{}"),
        OutgoingMessage(key="k", headers={}, body=b"raw bytes"),
        OutgoingMessage(key="k", headers={**good, "content-type": "application/avro"}, body=b"x"),
    ]
    async with shop:
        await shop.transport.publish("rt.order", bad_messages)
        await shop.publish(OrderPlaced(order_id="after", amount_cents=1))
        await wait_for(lambda: handled == ["after"])
        dead = await read_all(url, dead_letter_channel("rt.order", "shop"), 6)
    assert len(dead) == 6
    by_offset = {int(d.headers["nervus_dlq_offset"]): d for d in dead}
    assert sorted(by_offset) == [0, 1, 2, 3, 4, 5]
    reasons = [by_offset[i].headers["nervus_dlq_reason"] for i in range(6)]
    assert reasons == ["decode-error", "decode-error", "unknown-type"] + ["decode-error"] * 3
    assert "cannot decode" in by_offset[0].headers["nervus_dlq_message"]
    assert by_offset[0].headers["nervus_dlq_error_type"] == "nervus.errors.DecodeError"
    assert "rt.order.shipped.v9" in by_offset[2].headers["nervus_dlq_message"]
    assert "ce_id" in by_offset[3].headers["nervus_dlq_message"]
    assert "ce_type" in by_offset[4].headers["nervus_dlq_message"]
    assert "'application/avro' is not supported" in by_offset[5].headers["nervus_dlq_message"]
    for d in dead:
        assert d.headers["nervus_dlq_attempts"] == "1"
        assert d.headers["nervus_dlq_channel"] == "rt.order"
        assert d.headers["nervus_dlq_group"] == "shop"
    assert by_offset[4].body == b"raw bytes"


async def test_known_types_without_a_handler_in_the_group_are_acked_and_skipped() -> None:
    url = memory_url()
    first = Service("shop", settings=settings(url))
    handled: list[str] = []

    @first.on(OrderPlaced)
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        handled.append(event.order_id)

    async with first:
        await first.publish_many(
            [OrderCancelled(order_id="x"), OrderPlaced(order_id="x", amount_cents=1)]
        )
        await wait_for(lambda: handled == ["x"])
        await first.publish(OrderCancelled(order_id="y"))
        await asyncio.sleep(0.05)

    # a new member of the group finds nothing left: the skipped ones were acked
    second = Service("shop", settings=settings(url))
    again: list[str] = []

    @second.on(OrderPlaced)
    async def handle_again(event: OrderPlaced, ctx: Context) -> None:
        again.append(event.order_id)

    async with second:
        await asyncio.sleep(0.1)
        (consumer,) = second.consumers
        assert consumer.peak_in_flight == 0
    assert again == []
    assert await read_all(url, dead_letter_channel("rt.order", "shop"), 0) == []


def test_bad_transport_url_fails_when_the_service_is_made() -> None:
    with pytest.raises(ConfigurationError) as info:
        Service("shop", settings=settings("memory://x?partitionz=2"))
    assert info.value.problems == [
        "transport (NERVUS_TRANSPORT): unknown option 'partitionz' in 'memory://x?partitionz=2'; "
        "accepted: partitions"
    ]


async def test_unreachable_transport_fails_at_start_before_any_handler(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where a directory should be")
    url = f"sqlite:///{tmp_path}/not-a-dir/log.db"
    shop = Service("shop", settings=settings(url))
    ran: list[object] = []

    @shop.on(OrderPlaced)
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        ran.append(event)

    with pytest.raises(TransportUnavailable, match="not-a-dir"):
        await shop.start()
    assert ran == []
    assert shop.state == "new"  # nothing started; start() may be tried again


def test_settings_come_from_the_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NERVUS_TRANSPORT", "memory://from-env")
    monkeypatch.setenv("NERVUS_MAX_IN_FLIGHT", "7")
    shop = Service("shop")
    assert shop.settings.transport == "memory://from-env"
    assert shop.settings.max_in_flight == 7
    monkeypatch.setenv("NERVUS_MAX_IN_FLIGHT", "0")
    declared_early = Service("shop")  # declared before the environment is right: not read yet
    monkeypatch.setenv("NERVUS_MAX_IN_FLIGHT", "9")
    assert declared_early.settings.max_in_flight == 9, "settings are read on first use"
    monkeypatch.setenv("NERVUS_MAX_IN_FLIGHT", "0")
    with pytest.raises(ConfigurationError, match="NERVUS_MAX_IN_FLIGHT"):
        _ = Service("shop").settings
    assert Service("shop", settings=Settings(transport="memory://explicit")).settings.max_in_flight


def test_handler_declarations_are_checked() -> None:
    shop = Service("shop", settings=Settings(transport="memory://decl"))

    @shop.on(OrderPlaced)
    async def first(event: OrderPlaced, ctx: Context) -> None:
        return None

    with pytest.raises(ConfigurationError, match="one handler per type per group"):

        @shop.on(OrderPlaced)
        async def second(event: OrderPlaced, ctx: Context) -> None:
            return None

    @shop.on(OrderPlaced, group="other")
    async def in_other_group(event: OrderPlaced, ctx: Context) -> None:
        return None

    with pytest.raises(ConfigurationError, match="async def"):
        shop.on(PaymentCaptured)(lambda e, c: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigurationError, match="group="):
        shop.on(PaymentCaptured, group="no spaces")
    with pytest.raises(ConfigurationError, match="Service name"):
        Service("bad name", settings=Settings(transport="memory://decl"))
    with pytest.raises(ConfigurationError, match="declare a type name"):
        shop.on(Event)


async def test_no_handlers_after_start_and_no_restart_after_stop() -> None:
    shop = Service("shop", settings=settings(memory_url()))
    async with shop:

        async def late(event: OrderPlaced, ctx: Context) -> None:
            return None

        with pytest.raises(ConfigurationError, match="before service 'shop' starts"):
            shop.on(OrderPlaced)(late)
    with pytest.raises(ConfigurationError, match="create a new Service"):
        await shop.start()


async def test_a_failing_consumer_stops_the_service_and_run_raises() -> None:
    url = memory_url()
    shop = Service("shop", settings=settings(url))

    @shop.on(OrderPlaced)
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        return None

    runner = asyncio.create_task(shop.run())
    await wait_for(lambda: shop.state == "running")
    transport: Transport = shop.transport
    await transport.close()  # the broker connection goes away under the consumer
    async with asyncio.timeout(5):
        with pytest.raises(Exception, match="closed"):
            await runner
    assert shop.state == "closed"


async def test_stop_while_running_waits_for_the_one_stop_under_way() -> None:
    shop = Service("shop", settings=settings(memory_url()))
    release = asyncio.Event()
    finished: list[str] = []

    @shop.on(OrderPlaced)
    async def handle(event: OrderPlaced, ctx: Context) -> None:
        await release.wait()
        finished.append(event.order_id)

    runner = asyncio.create_task(shop.run())
    await wait_for(lambda: shop.state == "running")
    await shop.publish(OrderPlaced(order_id="o-1", amount_cents=1))
    await wait_for(lambda: shop.consumers[0].in_flight == 1)
    first = asyncio.create_task(shop.stop())
    second = asyncio.create_task(shop.stop())
    await asyncio.sleep(0.02)
    assert not first.done()
    assert not second.done()
    assert not runner.done()
    release.set()
    async with asyncio.timeout(5):
        await asyncio.gather(first, second, runner)
    assert finished == ["o-1"]
    assert shop.state == "closed"
