"""What is specific to the NATS JetStream transport: names on the server, CloudEvents
headers seen by plain NATS clients, duplicate publishes, URL options and errors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.msg import Msg

from nervus.errors import ConfigurationError, TransportError, TransportUnavailable
from nervus.transports import (
    DeadLetterReason,
    Delivery,
    OutgoingMessage,
    Subscription,
    dead_letter_channel,
    from_url,
)
from nervus.transports.nats import NatsSettings, NatsTransport
from nervus.transports.nats._subscription import NatsSubscription


async def delete_namespace(url: str, namespace: str) -> None:
    """Delete the streams and the groups bucket a test's namespace created."""
    import nats

    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=10)
        for info in await js.streams_info():
            stream = info.config.name or ""
            if stream.startswith(f"{namespace}_") or stream == f"KV_{namespace}-groups":
                await js.delete_stream(stream)
    finally:
        await nc.close()


@pytest.fixture
async def namespace(nats_url: str) -> AsyncIterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    await delete_namespace(nats_url, name)


@pytest.fixture
async def transport(nats_url: str, namespace: str) -> AsyncIterator[NatsTransport]:
    t = from_url(f"{nats_url}?partitions=3&namespace={namespace}&lease_seconds=2")
    assert isinstance(t, NatsTransport)
    async with t:
        yield t


def cloudevent(n: int, key: str | None = "order-1") -> OutgoingMessage:
    return OutgoingMessage(
        key=key,
        headers={
            "ce_specversion": "1.0",
            "ce_id": f"id-{n}-{uuid.uuid4().hex}",
            "ce_type": "shop.order.placed.v1",
            "ce_source": "/orders",
            "content-type": "application/json",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        body=b'{"n": %d}' % n,
    )


async def fetch_all(sub: Subscription, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            batch = await sub.fetch(count - len(got), 0.2)
            await sub.ack(batch)
            got += batch
    return got


# -- names on the server -------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.nats
async def test_channel_is_a_file_stream_with_a_subject_per_partition(
    transport: NatsTransport, namespace: str
) -> None:
    import nats.js.api

    channel = "orders.placed"
    assert await transport.ensure_channel(channel, 5) == 5
    assert await transport.ensure_channel(channel, 2) == 5, "the existing count wins"
    info = await transport.client.jetstream().stream_info(f"{namespace}_orders=2Eplaced")
    assert info.config.storage == nats.js.api.StorageType.FILE
    assert info.config.subjects == [f"{namespace}.orders.placed.{p}" for p in range(5)]


@pytest.mark.integration
@pytest.mark.nats
async def test_channel_names_that_are_not_subjects_are_refused(transport: NatsTransport) -> None:
    for bad in ("", "orders..placed", "orders.*", "orders >", "orders."):
        with pytest.raises(ConfigurationError, match="channel"):
            await transport.ensure_channel(bad)


@pytest.mark.integration
@pytest.mark.nats
async def test_group_consumers_are_durable_per_partition(
    transport: NatsTransport, namespace: str
) -> None:
    await transport.ensure_channel("payments")
    sub = await transport.subscribe(["payments"], "billing.v2")
    try:
        assert sub.assignment() == {("payments", p) for p in range(3)}
        js = transport.client.jetstream()
        for p in range(3):
            info = await js.consumer_info(f"{namespace}_payments", f"billing=2Ev2_{p}")
            assert info.config.filter_subject == f"{namespace}.payments.{p}"
            assert info.config.durable_name == f"billing=2Ev2_{p}"
    finally:
        await sub.close()


# -- interoperability with plain NATS clients --------------------------------------


@pytest.mark.integration
@pytest.mark.nats
async def test_plain_client_reads_what_nervus_publishes(
    transport: NatsTransport, nats_url: str, namespace: str
) -> None:
    import nats

    sent = [cloudevent(n) for n in range(3)]
    await transport.publish("shipments", sent)
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        psub = await js.pull_subscribe(
            f"{namespace}.shipments.*", durable=None, stream=f"{namespace}_shipments"
        )
        msgs = await psub.fetch(3, timeout=5)
        for msg in msgs:
            await msg.ack()
    finally:
        await nc.close()
    assert [m.data for m in msgs] == [m.body for m in sent]
    partition = {m.subject for m in msgs}
    assert len(partition) == 1, "one key, one partition subject"
    for msg, original in zip(msgs, sent, strict=True):
        assert msg.headers is not None
        for name, value in original.headers.items():
            assert msg.headers[name] == value
        assert msg.headers["ce_partitionkey"] == "order-1"
        assert msg.headers["Nats-Msg-Id"] == original.headers["ce_id"]


@pytest.mark.integration
@pytest.mark.nats
async def test_nervus_consumes_what_a_plain_client_publishes(
    transport: NatsTransport, nats_url: str, namespace: str
) -> None:
    import nats

    await transport.ensure_channel("refunds")
    sub = await transport.subscribe(["refunds"], "accounting")
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        headers = {
            "ce_specversion": "1.0",
            "ce_id": "refund-1",
            "ce_type": "shop.refund.issued.v1",
            "ce_source": "/legacy",
            "ce_partitionkey": "customer-9",
            "content-type": "application/json",
        }
        ack = await js.publish(f"{namespace}.refunds.2", b'{"cents": 500}', headers=headers)
    finally:
        await nc.close()
    [d] = await fetch_all(sub, 1)
    await sub.close()
    assert (d.channel, d.partition, d.offset) == ("refunds", 2, ack.seq)
    assert d.key == "customer-9"
    assert d.body == b'{"cents": 500}'
    assert d.headers == headers
    assert d.attempt == 1
    assert abs(d.timestamp - time.time()) < 60


@pytest.mark.integration
@pytest.mark.nats
async def test_a_dead_letter_keeps_its_traceback_and_header_values_arrive_unchanged(
    transport: NatsTransport, nats_url: str, namespace: str
) -> None:
    import nats

    tricky = {
        "note": "two\r\nlines\nand a third",
        "padded": "  spaces and a tab at both ends\t",
        "percent": "100%0A of it, literally",
        "mixed": "50%\noff",
        "blank": "   ",
        "empty": "",
        "wide": "\u2028caf\u00e9\u00a0",
    }
    message = cloudevent(1, key="line\nkey")
    message.headers.update(tricky)
    await transport.publish("letters", [message])
    sub = await transport.subscribe(["letters"], "sorter")
    [d] = await fetch_all(sub, 1)
    assert d.headers == {**message.headers, "ce_partitionkey": "line\nkey"}
    assert d.key == "line\nkey"

    fetched = await transport.subscribe(["letters"], "mailer")
    taken: list[Delivery] = []
    async with asyncio.timeout(10):
        while not taken:
            taken = list(await fetched.fetch(1, 0.2))
    [failing] = taken
    trace = (
        "Traceback (most recent call last):\n"
        '  File "shop/mailer.py", line 12, in on_order\n'
        "    raise ValueError(reason)\n"
        "ValueError: no address\n"
    )
    reason = DeadLetterReason(
        reason="handler-failed",
        message="no address\nfor customer 7",
        error_type="ValueError",
        traceback=trace,
        attempts=3,
    )
    await fetched.dead_letter(failing, reason)
    await fetched.close()
    dlq = await transport.subscribe([dead_letter_channel("letters", "mailer")], "audit")
    [dead] = await fetch_all(dlq, 1)
    await dlq.close()
    await sub.close()
    assert dead.headers["nervus_dlq_traceback"] == trace
    assert dead.headers["nervus_dlq_message"] == "no address\nfor customer 7"
    assert {k: dead.headers[k] for k in tricky} == tricky
    assert "nervus_encoded" not in dead.headers

    # A plain client sees the values percent-encoded and named; nervus leaves the
    # values of a plain client's message (no such list) as they are.
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        psub = await js.pull_subscribe(
            f"{namespace}.letters.*", durable=None, stream=f"{namespace}_letters"
        )
        [raw] = await psub.fetch(1, timeout=5)
        await raw.ack()
        assert raw.headers is not None
        assert raw.headers["note"] == "two%0D%0Alines%0Aand a third"
        assert raw.headers["percent"] == "100%0A of it, literally", "left as it was"
        assert raw.headers["mixed"] == "50%25%0Aoff"
        assert raw.headers["empty"] == ""
        assert set(raw.headers["nervus_encoded"].split(",")) == {
            "note",
            "padded",
            "mixed",
            "blank",
            "wide",
            "ce_partitionkey",
        }
        plain = {**cloudevent(2).headers, "percent": "100%0A"}
        await js.publish(f"{namespace}.letters.0", b"{}", headers=plain)
    finally:
        await nc.close()
    reader = await transport.subscribe(["letters"], "sorter")
    [from_plain] = await fetch_all(reader, 1)
    await reader.close()
    assert from_plain.headers == plain


# -- publishing ----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.nats
async def test_a_publish_repeated_with_the_same_ce_id_is_dropped(
    transport: NatsTransport,
) -> None:
    message = cloudevent(1)
    await transport.publish("invoices", [message])
    await transport.publish("invoices", [message, cloudevent(2)])
    sub = await transport.subscribe(["invoices"], "mailer")
    got = await fetch_all(sub, 2)
    more = await sub.fetch(10, 0.3)
    await sub.close()
    assert not more, "the repeated publish was stored twice"
    assert sorted(d.body for d in got) == [b'{"n": 1}', b'{"n": 2}']


@pytest.mark.integration
@pytest.mark.nats
async def test_a_large_batch_is_published_and_keeps_key_order(transport: NatsTransport) -> None:
    messages = [cloudevent(n, key=f"k{n % 5}") for n in range(3000)]
    await transport.publish("bulk", messages)
    sub = await transport.subscribe(["bulk"], "reader", max_in_flight=500)
    got = await fetch_all(sub, 3000)
    await sub.close()
    by_key: dict[str | None, list[int]] = {}
    for d in got:
        by_key.setdefault(d.key, []).append(int(d.body[6:-1]))
    assert sorted(n for ns in by_key.values() for n in ns) == list(range(3000))
    for ns in by_key.values():
        assert ns == sorted(ns)


@pytest.mark.integration
@pytest.mark.nats
async def test_a_publish_jetstream_refuses_fails_with_its_reason(
    transport: NatsTransport, nats_url: str, namespace: str
) -> None:
    import nats

    refused = OutgoingMessage(key=None, headers={"Nats-Expected-Stream": "another"}, body=b"")
    with pytest.raises(TransportError, match="stream") as caught:
        await transport.publish("checked", [cloudevent(1), refused])
    assert not caught.value.retryable
    assert caught.value.channel == "checked"

    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        await nc.jetstream().delete_stream(f"{namespace}_checked")
    finally:
        await nc.close()
    started = time.monotonic()
    with pytest.raises(TransportUnavailable, match="publishing"):
        await transport.publish("checked", [cloudevent(2)])
    assert time.monotonic() - started < 5, "no stream answered: that is known at once"


@pytest.mark.integration
@pytest.mark.nats
async def test_nack_delay_is_kept_by_the_server_for_the_next_member(
    transport: NatsTransport, nats_url: str, namespace: str
) -> None:
    await transport.publish("retries", [cloudevent(1)])
    first = await transport.subscribe(["retries"], "workers")
    fetched: list[Delivery] = []
    async with asyncio.timeout(10):
        while not fetched:
            fetched = list(await first.fetch(1, 0.2))
    [d] = fetched
    await first.nack(d, 1.0)
    nacked_at = time.monotonic()
    await first.close()
    other = from_url(f"{nats_url}?partitions=3&namespace={namespace}&lease_seconds=2")
    async with other:
        second = await other.subscribe(["retries"], "workers")
        [again] = await fetch_all(second, 1)
        assert time.monotonic() - nacked_at >= 1.0
        assert again.attempt == 2
        assert again.offset == d.offset
        await second.close()


# -- consuming -----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.nats
async def test_a_pull_request_that_ends_without_a_status_is_asked_again(
    transport: NatsTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server may end an expired pull request without its 408 status (when a
    message comes in after the expiry, before its expiry timer runs). Here every
    status is lost: a fetch must still ask again once the request expired, rather
    than leave the partition unread while messages wait."""
    original = NatsSubscription._on_message

    async def statuses_lost(self: NatsSubscription, msg: Msg) -> None:
        if msg.reply:  # a message; statuses have no reply subject
            await original(self, msg)

    monkeypatch.setattr(NatsSubscription, "_on_message", statuses_lost)
    await transport.ensure_channel("quiet", 1)
    sub = await transport.subscribe(["quiet"], "listener")
    try:
        assert await sub.fetch(10, 0.3) == []  # its pull request expires unanswered
        await transport.publish("quiet", [cloudevent(1)])
        got = await sub.fetch(10, 0.8)
        assert [d.body for d in got] == [b'{"n": 1}']
        await sub.ack(got)
    finally:
        await sub.close()


# -- settings and errors ---------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.nats
async def test_unreachable_server_fails_connect_in_bounded_time() -> None:
    transport = from_url("nats://nervus:s3cret@127.0.0.1:1?connect_timeout=1")
    started = time.monotonic()
    with pytest.raises(TransportUnavailable) as caught:
        await transport.connect()
    assert time.monotonic() - started < 5
    text = str(caught.value)
    assert "nats://nervus:***@127.0.0.1:1" in text
    assert "s3cret" not in text
    await transport.close()


@pytest.mark.unit
def test_url_options_are_typed_and_every_problem_is_named() -> None:
    t = from_url("nats://a:4222,b?partitions=6&namespace=shop&ack_wait=20")
    assert isinstance(t, NatsTransport)
    assert t.settings.servers == ["nats://a:4222", "nats://b:4222"]
    assert (t.settings.partitions, t.settings.namespace, t.settings.ack_wait) == (6, "shop", 20)
    assert t.settings.heartbeat == 2.5
    with pytest.raises(ConfigurationError, match="unknown option 'colour'"):
        from_url("nats://h?colour=blue")
    with pytest.raises(ConfigurationError) as caught:
        from_url("nats://h?partitions=0&namespace=a.b&lease_seconds=-1")
    problems = "\n".join(caught.value.problems)
    for word in ("partitions=0", "namespace='a.b'", "lease_seconds=-1"):
        assert word in problems
    with pytest.raises(ConfigurationError, match="heartbeat_seconds"):
        from_url("nats://h?lease_seconds=3&heartbeat_seconds=2")


@pytest.mark.unit
def test_settings_validate_lists_every_problem() -> None:
    settings = NatsSettings(servers=[], replicas=9, ack_wait=0, namespace="kv")
    problems = settings.validate()
    assert len(problems) == 4, problems
