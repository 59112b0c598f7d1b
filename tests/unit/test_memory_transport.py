"""The in-memory transport beyond the conformance suite: URLs, sharing a broker,
misuse errors, and settlement across rebalances."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from nervus.errors import ConfigurationError, TransportError
from nervus.transports import (
    DeadLetterReason,
    Delivery,
    OutgoingMessage,
    Start,
    Subscription,
    Transport,
    from_url,
)
from nervus.transports.memory import MemoryTransport

pytestmark = pytest.mark.unit


def msgs(*ns: int, key: str | None = "k") -> list[OutgoingMessage]:
    return [OutgoingMessage(key=key, headers={"n": str(n)}, body=str(n).encode()) for n in ns]


def ns(deliveries: Sequence[Delivery]) -> list[int]:
    return [int(d.headers["n"]) for d in deliveries]


@pytest.fixture
async def opener() -> AsyncIterator[Callable[..., Transport]]:
    """Opens connected transports on a broker of this test's own; closes them after."""
    name = f"unit-{uuid.uuid4().hex}"
    opened: list[Transport] = []

    def open_(partitions: int = 2) -> Transport:
        transport = from_url(f"memory://{name}?partitions={partitions}")
        opened.append(transport)
        return transport

    yield open_
    for transport in opened:
        await transport.close()


async def fetch_all(sub: Subscription, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(5):
        while len(got) < count:
            got += await sub.fetch(count - len(got), 0.05)
    return got


def test_url_names_the_broker_and_its_options() -> None:
    transport = from_url("memory://orders?partitions=8")
    assert isinstance(transport, MemoryTransport)
    assert (transport.name, transport.partitions) == ("orders", 8)
    default = from_url("memory://")
    assert isinstance(default, MemoryTransport)
    assert (default.name, default.partitions) == ("default", 4)
    assert not MemoryTransport.features.cross_process_groups
    assert "cross_process_groups" in MemoryTransport.features.reasons


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("memory://x?partitions=none", "NERVUS_TRANSPORT: option partitions='none'"),
        ("memory://x?partitions=0", "partitions=0: must be 1 or more"),
        ("memory://x?partition=2", "unknown option 'partition'"),
    ],
)
def test_bad_url_options_name_the_setting(url: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        from_url(url)
    assert any(fragment in problem for problem in caught.value.problems), caught.value.problems


async def test_use_before_connect_says_how_to_fix() -> None:
    transport = MemoryTransport(f"unit-{uuid.uuid4().hex}")
    with pytest.raises(TransportError, match="await connect"):
        await transport.publish("c", msgs(1))


async def test_transports_with_one_name_share_a_broker(
    opener: Callable[..., Transport],
) -> None:
    producer, consumer = opener(), opener()
    other = MemoryTransport(f"unit-{uuid.uuid4().hex}")
    for t in (producer, consumer, other):
        await t.connect()
    await producer.publish("c", msgs(1, 2))
    sub = await consumer.subscribe(["c"], "g")
    assert ns(await fetch_all(sub, 2)) == [1, 2]
    alone = await other.subscribe(["c"], "g")
    assert await alone.fetch(10, 0) == []
    await other.close()


async def test_existing_partition_count_wins(opener: Callable[..., Transport]) -> None:
    first, second = opener(partitions=3), opener(partitions=5)
    await first.connect()
    await second.connect()
    assert await first.ensure_channel("c") == 3
    assert await second.ensure_channel("c", 7) == 3
    assert await second.ensure_channel("d") == 5


async def test_fetch_wakes_when_a_message_arrives(opener: Callable[..., Transport]) -> None:
    transport = opener()
    await transport.connect()
    sub = await transport.subscribe(["c"], "g")
    waiting = asyncio.create_task(sub.fetch(10, 60))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await transport.publish("c", msgs(1))
    async with asyncio.timeout(5):  # far less than the fetch's own 60 s
        assert ns(await waiting) == [1]


async def test_close_interrupts_a_waiting_fetch(opener: Callable[..., Transport]) -> None:
    transport = opener()
    await transport.connect()
    sub = await transport.subscribe(["c"], "g")
    waiting = asyncio.create_task(sub.fetch(10, 60))
    await asyncio.sleep(0.01)
    await sub.close()
    async with asyncio.timeout(5):
        with pytest.raises(TransportError, match="is closed"):
            await waiting


async def test_settling_twice_or_elsewhere_is_refused(opener: Callable[..., Transport]) -> None:
    transport = opener()
    await transport.connect()
    await transport.publish("c", msgs(1, 2))
    sub = await transport.subscribe(["c"], "g")
    other = await transport.subscribe(["d"], "g2")
    first, second = await fetch_all(sub, 2)
    await sub.ack([first])
    with pytest.raises(ValueError, match="already settled"):
        await sub.nack(first, 0)
    with pytest.raises(ValueError, match="not fetched by this subscription"):
        await other.ack([second])
    with pytest.raises(ValueError, match="delay"):
        await sub.nack(second, -1)
    await sub.dead_letter(second, DeadLetterReason(reason="rejected", message="no"))


async def test_bad_arguments_are_refused(opener: Callable[..., Transport]) -> None:
    transport = opener()
    await transport.connect()
    with pytest.raises(ValueError, match="at least one channel"):
        await transport.subscribe([], "g")
    with pytest.raises(ValueError, match="group name"):
        await transport.subscribe(["c"], "")
    with pytest.raises(ValueError, match="channel name"):
        await transport.publish("", msgs(1))
    with pytest.raises(ValueError, match="does not read"):
        await transport.subscribe(["c"], "g", start=Start.at({"other": {0: 0}}))
    with pytest.raises(ValueError, match="no partition"):
        await transport.subscribe(["c"], "g", start=Start.at({"c": {9: 0}}))
    sub = await transport.subscribe(["c"], "g")
    assert await sub.fetch(0, 1) == []
    with pytest.raises(ValueError, match="max_messages"):
        await sub.fetch(-1, 0)


async def test_settling_a_revoked_delivery_changes_nothing(
    opener: Callable[..., Transport],
) -> None:
    transport = opener(partitions=2)
    await transport.connect()
    await transport.publish("c", msgs(*range(6), key=None))  # round-robin: 3 per partition
    first = await transport.subscribe(["c"], "g")
    held = await fetch_all(first, 6)
    second = await transport.subscribe(["c"], "g")
    moved = second.assignment()
    assert len(moved) == 1
    assert not (moved & first.assignment())
    await first.ack(held)  # those of the moved partition no longer count
    again = await fetch_all(second, 3)
    assert {(d.channel, d.partition) for d in again} == moved
    assert sorted(ns(again)) == sorted(
        n for n, d in zip(ns(held), held, strict=True) if (d.channel, d.partition) in moved
    )


async def test_tracker_state_is_dropped_when_a_partition_comes_back(
    opener: Callable[..., Transport],
) -> None:
    transport = opener(partitions=2)
    await transport.connect()
    await transport.publish("c", msgs(*range(6), key=None))  # round-robin: 3 per partition
    first = await transport.subscribe(["c"], "g")
    unsettled = await fetch_all(first, 6)
    second = await transport.subscribe(["c"], "g")
    moved = second.assignment()
    assert moved
    assert not (moved & first.assignment())
    await second.close()  # the moved partition comes back to the first member
    assert first.assignment() == {("c", 0), ("c", 1)}
    await first.ack([d for d in unsettled if (d.channel, d.partition) not in moved])
    again = await fetch_all(first, 3)
    assert {(d.channel, d.partition) for d in again} == moved
    await first.ack(again)
    await first.close()
    # Everything was settled by its current owner, so the group resumes at the end.
    last = await transport.subscribe(["c"], "g")
    assert await last.fetch(10, 0.05) == []


async def test_an_old_delivery_of_a_partition_owned_again_commits_nothing(
    opener: Callable[..., Transport],
) -> None:
    transport = opener(partitions=2)
    await transport.connect()
    await transport.publish("c", msgs(*range(6), key=None))
    first = await transport.subscribe(["c"], "g")
    old = await fetch_all(first, 6)
    second = await transport.subscribe(["c"], "g")
    moved = second.assignment()
    await second.close()
    fresh = await fetch_all(first, 3)  # the moved partition, read again from its position
    assert {(d.channel, d.partition) for d in fresh} == moved
    await first.ack([d for d in old if (d.channel, d.partition) in moved])  # stale copies
    await first.close()
    after = await transport.subscribe(["c"], "g")
    again = await fetch_all(after, 6)  # nothing was committed on either partition
    assert sorted(ns(again)) == list(range(6))


async def test_a_pending_redelivery_outlives_its_member(opener: Callable[..., Transport]) -> None:
    transport = opener(partitions=1)
    await transport.connect()
    await transport.publish("c", msgs(1, 2))
    first = await transport.subscribe(["c"], "g")
    one, two = await fetch_all(first, 2)
    await first.nack(one, 0.05)
    await first.ack([two])
    await first.close()
    second = await transport.subscribe(["c"], "g")
    [again] = await fetch_all(second, 1)
    assert (ns([again]), again.attempt) == ([1], 2)
    await second.ack([again])
    assert await second.fetch(10, 0.1) == []


async def test_a_redelivery_handed_out_is_released_on_close(
    opener: Callable[..., Transport],
) -> None:
    transport = opener(partitions=1)
    await transport.connect()
    await transport.publish("c", msgs(1))
    first = await transport.subscribe(["c"], "g")
    [one] = await fetch_all(first, 1)
    await first.nack(one, 0)
    [copy] = await fetch_all(first, 1)
    assert copy.attempt == 2
    await first.close()  # the copy was never settled
    second = await transport.subscribe(["c"], "g")
    [again] = await fetch_all(second, 1)
    assert (ns([again]), again.attempt) == ([1], 2)


async def test_start_end_skips_history(opener: Callable[..., Transport]) -> None:
    transport = opener()
    await transport.connect()
    await transport.publish("c", msgs(1, 2))
    sub = await transport.subscribe(["c"], "g", start=Start.end())
    assert await sub.fetch(10, 0.05) == []
    await transport.publish("c", msgs(3))
    assert ns(await fetch_all(sub, 1)) == [3]


async def test_replay_resets_members_already_reading(opener: Callable[..., Transport]) -> None:
    transport = opener(partitions=1)
    await transport.connect()
    await transport.publish("c", msgs(1, 2, 3))
    reader = await transport.subscribe(["c"], "g")
    stale = await fetch_all(reader, 3)
    replay = await transport.subscribe(["c"], "g", start=Start.beginning())
    owner = reader if reader.assignment() else replay
    await reader.ack(stale)  # read before the replay moved the group: no effect
    assert ns(await fetch_all(owner, 3)) == [1, 2, 3]
