"""The transport conformance suite: the same scenarios for every transport.

A transport's test module subclasses ``TransportConformance`` and provides the
``transport_url`` fixture::

    class TestMemoryTransport(TransportConformance):
        @pytest.fixture
        def transport_url(self) -> str:
            return f"memory://t-{uuid.uuid4().hex}?partitions=4"

Every scenario opens its transports with ``from_url(transport_url)`` (child
processes open the same URL), uses channel and group names of its own, and runs
under a hard timeout. The ``features`` fixture (by default the ``features`` the
transport class declares) decides what runs: a scenario needing a feature
declared missing is skipped with the reason from ``Features.reasons``.

Class attributes a transport's subclass may override:

``rebalance_timeout``
    seconds a group may take to settle its assignment after a join or a leave
    (lease-based transports: a little more than a lease);
``delivery_timeout``
    seconds to wait for messages that must arrive;
``scenario_timeout``
    the hard limit of one scenario;
``quiet_period``
    seconds a consumer keeps fetching to show that nothing more arrives;
``nack_delay``
    the delay of the delayed-redelivery scenario;
``partitions``
    partitions asked of ``ensure_channel`` (at least 3; the existing count wins).

Scenarios that run processes are marked ``slow``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from nervus.errors import TransportClosed
from nervus.testing._scenario import (
    Scenario,
    body_of,
    describe,
    number,
    numbers,
    short,
)
from nervus.transports import (
    DeadLetterReason,
    Delivery,
    Features,
    Start,
    dead_letter_channel,
    from_url,
)


class TransportConformance:
    """Scenarios every transport passes; subclass it and provide ``transport_url``."""

    rebalance_timeout: float = 10.0
    delivery_timeout: float = 10.0
    scenario_timeout: float = 60.0
    quiet_period: float = 0.3
    nack_delay: float = 0.4
    partitions: int = 4

    # -- what a transport provides ------------------------------------------------------

    @pytest.fixture
    def transport_url(self) -> str:
        """The URL of the transport under test; override it in the subclass."""
        pytest.fail(
            f"{type(self).__name__} must provide the 'transport_url' fixture: the URL "
            "from_url() opens the transport under test with"
        )

    @pytest.fixture
    def features(self, transport_url: str) -> Features:
        """What the transport supports; by default what its class declares."""
        return from_url(transport_url).features

    # -- how scenarios run -------------------------------------------------------------

    @asynccontextmanager
    async def scenario(self, url: str) -> AsyncIterator[Scenario]:
        """A ``Scenario`` under the hard ``scenario_timeout``, closed at the end."""
        scenario = Scenario(
            url, rebalance_timeout=self.rebalance_timeout, delivery_timeout=self.delivery_timeout
        )
        limit = asyncio.timeout(self.scenario_timeout)
        try:
            async with limit:
                yield scenario
        except TimeoutError:
            if limit.expired():
                pytest.fail(f"scenario did not finish within {self.scenario_timeout}s")
            raise
        finally:
            await scenario.close()

    @staticmethod
    def require(features: Features, *names: str) -> None:
        """Skip the scenario unless the transport declares every feature in ``names``."""
        for name in names:
            if not getattr(features, name):
                reason = features.reasons.get(name, "declared unsupported")
                pytest.skip(f"feature {name} not supported: {reason}")

    # -- publishing and consuming ------------------------------------------------------

    @pytest.mark.asyncio
    async def test_publish_then_consume_once(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("once"), s.name("group")
            sent = await s.publish(transport, channel, range(40))
            sub = await s.subscribe(transport, [channel], group)
            got = await s.consume(sub, sent, max_messages=7)
            got += await s.expect_quiet(sub, self.quiet_period)

            counts = Counter(numbers(got))
            assert sorted(counts) == sent, f"missing {short(set(sent) - set(counts))}"
            twice = sorted(n for n, c in counts.items() if c > 1)
            assert not twice, f"delivered more than once to a single member: {twice}"
            partition_of_key: dict[str | None, int] = {}
            last_offset: dict[int, int] = {}
            for d in got:
                n = number(d)
                assert d.channel == channel
                assert d.key == f"key-{n % 7}"
                assert d.body == body_of(n)
                assert d.headers["x-text"] == "é ü"
                assert d.headers["ce_id"].startswith(f"id-{n}-")
                assert d.attempt == 1, describe(d)
                assert partition_of_key.setdefault(d.key, d.partition) == d.partition, (
                    f"key {d.key!r} reached two partitions"
                )
                assert d.offset > last_offset.get(d.partition, -1), (
                    f"offsets not increasing on partition {d.partition}: {describe(d)}"
                )
                last_offset[d.partition] = d.offset

    @pytest.mark.asyncio
    async def test_each_group_gets_every_message(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel = s.name("groups")
            sent = await s.publish(transport, channel, range(20))
            for group in (s.name("first"), s.name("second")):
                sub = await s.subscribe(transport, [channel], group)
                got = await s.consume(sub, sent)
                got += await s.expect_quiet(sub, self.quiet_period)
                assert sorted(numbers(got)) == sent, f"group {group} got {short(numbers(got))}"

    @pytest.mark.asyncio
    async def test_subscribe_to_several_channels(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            first, second, group = s.name("first"), s.name("second"), s.name("group")
            await s.publish(transport, first, range(10))
            await s.publish(transport, second, range(10, 20))
            sub = await s.subscribe(transport, [first, second], group)
            got = await s.consume(sub, range(20))
            by_channel = {d.channel for d in got if number(d) < 10}
            assert by_channel == {first}
            assert {d.channel for d in got if number(d) >= 10} == {second}

    @pytest.mark.asyncio
    async def test_key_order_kept(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("order"), s.name("group")
            keys = [f"order-{k}" for k in range(9)]
            total = 0
            for _ in range(5):
                batch = range(total, total + 45)
                await s.publish(transport, channel, batch, key=lambda n: keys[n % len(keys)])
                total += len(batch)
            sub = await s.subscribe(transport, [channel], group)
            got = await s.consume(sub, range(total), max_messages=13)
            first_seen: dict[str, list[int]] = defaultdict(list)
            seen: set[int] = set()
            for d in got:
                n = number(d)
                if n not in seen:
                    seen.add(n)
                    assert d.key is not None
                    first_seen[d.key].append(n)
            for key, order in first_seen.items():
                assert order == sorted(order), f"key {key!r} arrived out of order: {order}"

    # -- groups ------------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_group_members_share_partitions(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            channel, group = s.name("share"), s.name("group")
            transports = [await s.open() for _ in range(3)]
            count = await transports[0].ensure_channel(channel, self.partitions)
            assert count >= 3, f"a channel needs 3+ partitions for 3 members, has {count}"
            pairs = {(channel, p) for p in range(count)}
            members = [await s.subscribe(t, [channel], group) for t in transports]
            await s.wait_for_assignment(members, pairs)

            sent = await s.publish(transports[0], channel, range(90), key=lambda n: f"k{n % 30}")
            got: list[list[Delivery]] = [[], [], []]
            await s.consume_together(members, sent, got)
            late = await asyncio.gather(*(s.expect_quiet(m, self.quiet_period) for m in members))
            for member, deliveries, more in zip(members, got, late, strict=True):
                deliveries += more
                owned = member.assignment()
                for d in deliveries:
                    assert (d.channel, d.partition) in owned, (
                        f"{describe(d)} went to a member owning {sorted(owned)}"
                    )
            counts = Counter(n for deliveries in got for n in numbers(deliveries))
            assert sorted(counts) == sent
            twice = sorted(n for n, c in counts.items() if c > 1)
            assert not twice, f"handled by two members (or twice) in a settled group: {twice}"

    @pytest.mark.asyncio
    async def test_rebalance_on_join_and_leave(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            channel, group = s.name("rebalance"), s.name("group")
            first_t, second_t = await s.open(), await s.open()
            count = await first_t.ensure_channel(channel, self.partitions)
            pairs = {(channel, p) for p in range(count)}
            first = await s.subscribe(first_t, [channel], group)
            got: list[list[Delivery]] = [[], []]
            await s.wait_for_assignment([first], pairs)
            assert first.assignment() == pairs

            await s.publish(first_t, channel, range(20))
            await s.consume(first, range(10), max_messages=1, into=got[0])

            second = await s.subscribe(second_t, [channel], group)
            await s.wait_for_assignment([first, second], pairs, into=got)
            assert first.assignment() < pairs, "the first member kept every partition"
            assert second.assignment(), "the joining member got no partition"

            await s.publish(first_t, channel, range(20, 40))
            await s.consume_together([first, second], range(40), got)

            # The second member takes some of the next messages, acks a few, then leaves.
            leaving = await s.publish(first_t, channel, range(40, 60), key=lambda n: f"k{n}")
            taken: list[Delivery] = []
            deadline = time.monotonic() + 1.0
            while not taken and time.monotonic() < deadline:
                taken += await second.fetch(10, 0.1)
            await second.ack(taken[:3])
            await second.close()
            await s.wait_for_assignment([first], pairs, into=[got[0]])
            assert first.assignment() == pairs
            await s.consume(first, set(leaving) - set(numbers(taken[:3])), into=got[0])
            seen = {n for deliveries in got for n in numbers(deliveries)} | set(numbers(taken[:3]))
            assert seen >= set(range(60)), f"lost {short(set(range(60)) - seen)}"

    @pytest.mark.slow
    @pytest.mark.asyncio
    async def test_killed_consumer_process_messages_redelivered(
        self, transport_url: str, features: Features
    ) -> None:
        self.require(features, "cross_process_groups")
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("killed"), s.name("group")
            count = await transport.ensure_channel(channel, self.partitions)
            sent = await s.publish(transport, channel, range(30))
            child = await s.start_child(channel, group, "--ack", "10", "--hold-after", "30")
            await s.wait_for_children(
                lambda: bool(child.of_kind("holding")),
                self.delivery_timeout + self.rebalance_timeout + 10,
                "fetch every message",
            )
            assert sorted(child.delivered()) == sent
            acked = set(child.acked())
            assert len(acked) == 10
            assert await child.kill() == -9

            sub = await s.subscribe(transport, [channel], group)
            got: list[Delivery] = []
            await s.wait_for_assignment([sub], {(channel, p) for p in range(count)}, [got])
            await s.consume(sub, set(sent) - acked, into=got)
            lost = set(sent) - acked - set(numbers(got))
            assert not lost, f"unacked messages of the killed consumer never came back: {lost}"

    @pytest.mark.slow
    @pytest.mark.asyncio
    async def test_consumer_processes_share_a_group(
        self, transport_url: str, features: Features
    ) -> None:
        self.require(features, "cross_process_groups")
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("processes"), s.name("group")
            count = await transport.ensure_channel(channel, self.partitions)
            pairs = frozenset((channel, p) for p in range(count))
            children = [await s.start_child(channel, group) for _ in range(2)]

            def split() -> bool:
                a, b = (c.assignment() for c in children)
                return bool(a) and bool(b) and not (a & b) and (a | b) == pairs

            await s.wait_for_children(
                split, self.rebalance_timeout + 10, "settle a split of the partitions"
            )
            settled_at = [len(c.of_kind("assignment")) for c in children]
            sent = await s.publish(transport, channel, range(60), key=lambda n: f"k{n % 20}")
            await s.wait_for_children(
                lambda: set(children[0].acked()) | set(children[1].acked()) >= set(sent),
                self.delivery_timeout,
                "consume every message together",
            )
            for child, before in zip(children, settled_at, strict=True):
                assert len(child.of_kind("assignment")) == before, (
                    f"assignment changed while consuming: {child.of_kind('assignment')}"
                )
                owned = child.assignment()
                for e in child.of_kind("delivery"):
                    assert (e["channel"], e["partition"]) in owned, f"{e} outside {sorted(owned)}"
            counts = Counter(children[0].delivered() + children[1].delivered())
            twice = sorted(n for n, c in counts.items() if c > 1)
            assert not twice, f"two processes (or one twice) got: {twice}"
            for child in children:
                assert await child.terminate(self.delivery_timeout) == 0
                assert child.of_kind("closed")

    # -- settling ----------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_nack_redelivers_as_next_attempt(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("nack"), s.name("group")
            sent = await s.publish(transport, channel, range(5))
            sub = await s.subscribe(transport, [channel], group)
            attempts: dict[int, list[int]] = defaultdict(list)
            again: Delivery | None = None
            async with s.within(self.delivery_timeout, "nack and redelivery"):
                while again is None or len(attempts) < len(sent):
                    for d in await sub.fetch(10, 0.1):
                        attempts[number(d)].append(d.attempt)
                        if number(d) == 2 and d.attempt == 1:
                            await sub.nack(d, 0)
                        else:
                            again = d if number(d) == 2 else again
                            await sub.ack([d])
            got = await s.expect_quiet(sub, self.quiet_period)
            assert not got, f"settled messages came again: {[describe(d) for d in got]}"
            assert again is not None
            assert attempts[2] == [1, 2]
            assert all(attempts[n] == [1] for n in sent if n != 2), attempts
            assert again.body == body_of(2)
            assert again.key == "key-2"
            assert again.headers["ce_id"].startswith("id-2-")

    @pytest.mark.asyncio
    async def test_nack_delay_respected(self, transport_url: str, features: Features) -> None:
        self.require(features, "delayed_redelivery")
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("delay"), s.name("group")
            await s.publish(transport, channel, [0])
            sub = await s.subscribe(transport, [channel], group)
            [first] = await s.consume(sub, [0], ack=False)
            nacked_at = time.monotonic()
            await sub.nack(first, self.nack_delay)
            others = await s.publish(transport, channel, range(1, 6))

            arrived: dict[int, float] = {}
            redelivered: Delivery | None = None
            async with s.within(self.delivery_timeout + self.nack_delay, "delayed redelivery"):
                while redelivered is None or len(arrived) < len(others):
                    batch = await sub.fetch(10, 0.1)
                    now = time.monotonic()
                    for d in batch:
                        if number(d) == 0:
                            redelivered = d
                            arrived[0] = now
                        else:
                            arrived.setdefault(number(d), now)
                    await sub.ack(batch)
            assert redelivered is not None
            assert redelivered.attempt == 2
            assert redelivered.body == body_of(0)
            assert arrived[0] >= nacked_at + self.nack_delay, (
                f"redelivered {arrived[0] - nacked_at:.3f}s after a nack delayed {self.nack_delay}s"
            )
            late = [n for n in others if arrived[n] > arrived[0]]
            assert not late, f"messages {late} waited for the delayed redelivery"

    @pytest.mark.asyncio
    async def test_dead_letter_after_attempts(self, transport_url: str, features: Features) -> None:
        max_attempts = 3
        delay = 0.05 if features.delayed_redelivery else 0.0
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("dlq"), s.name("group")
            sent = await s.publish(transport, channel, range(6), key=lambda n: "same-key")
            failing = 3
            sub = await s.subscribe(transport, [channel], group)
            attempts: list[int] = []
            acked: set[int] = set()
            last: Delivery | None = None
            async with s.within(self.delivery_timeout, "retries then dead-lettering"):
                while last is None or len(acked) < len(sent) - 1:
                    for d in await sub.fetch(10, 0.1):
                        if number(d) != failing:
                            acked.add(number(d))
                            await sub.ack([d])
                            continue
                        attempts.append(d.attempt)
                        if d.attempt < max_attempts:
                            await sub.nack(d, delay)
                            continue
                        last = d
                        reason = DeadLetterReason(
                            reason="handler-failed",
                            message="boom",
                            error_type="ValueError",
                            traceback="Traceback: ValueError: boom",
                            attempts=d.attempt,
                        )
                        await sub.dead_letter(d, reason)
            assert last is not None
            assert attempts == [1, 2, 3]
            got = await s.expect_quiet(sub, self.quiet_period)
            assert not got, f"settled messages came again: {[describe(d) for d in got]}"

            dlq = dead_letter_channel(channel, group)
            reader = await s.subscribe(transport, [dlq], s.name("dlq-reader"))
            [copy] = await s.consume(reader, [failing])
            assert copy.body == body_of(failing)
            assert copy.key == "same-key"
            h = copy.headers
            assert h["ce_id"].startswith(f"id-{failing}-")
            assert h["nervus_dlq_reason"] == "handler-failed"
            assert h["nervus_dlq_message"] == "boom"
            assert h["nervus_dlq_error_type"] == "ValueError"
            assert h["nervus_dlq_traceback"] == "Traceback: ValueError: boom"
            assert h["nervus_dlq_attempts"] == str(max_attempts)
            assert h["nervus_dlq_group"] == group
            assert h["nervus_dlq_channel"] == channel
            assert h["nervus_dlq_partition"] == str(last.partition)
            assert h["nervus_dlq_offset"] == str(last.offset)
            more = await s.expect_quiet(reader, self.quiet_period)
            assert not more, f"dead-lettered more than once: {[describe(d) for d in more]}"

    @pytest.mark.asyncio
    async def test_fetch_bound_limits_in_flight(self, transport_url: str) -> None:
        bound = 4
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("bound"), s.name("group")
            sent = await s.publish(transport, channel, range(10 * bound))
            sub = await s.subscribe(transport, [channel], group, max_in_flight=bound)
            held: dict[int, Delivery] = {}
            done: list[int] = []
            most = 0
            freed = asyncio.Event()

            async def hold_then_ack(d: Delivery) -> None:
                await asyncio.sleep(0.01)
                await sub.ack([d])
                del held[id(d)]
                done.append(number(d))
                freed.set()

            tasks: list[asyncio.Task[None]] = []
            async with s.within(self.delivery_timeout, f"consuming {len(sent)} messages"):
                while len(done) < len(sent):
                    free = bound - len(held)
                    if free == 0:
                        freed.clear()
                        await freed.wait()
                        continue
                    batch = await sub.fetch(free, 0.05)
                    assert len(batch) <= free, f"fetch({free}) returned {len(batch)}"
                    for d in batch:
                        held[id(d)] = d
                        tasks.append(asyncio.create_task(hold_then_ack(d)))
                    most = max(most, len(held))
                await asyncio.gather(*tasks)
            assert most <= bound
            assert sorted(done) == sent

    @pytest.mark.asyncio
    async def test_acked_prefix_committed(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("commit"), s.name("group")
            sent = await s.publish(transport, channel, range(24), key=lambda n: f"k{n % 6}")
            sub = await s.subscribe(transport, [channel], group)
            fetched = await s.consume(sub, sent, ack=False)
            by_partition: dict[int, list[Delivery]] = defaultdict(list)
            for d in fetched:
                by_partition[d.partition].append(d)
            prefix: list[Delivery] = []
            for deliveries in by_partition.values():
                deliveries.sort(key=lambda d: d.offset)
                prefix += deliveries[: math.ceil(len(deliveries) / 2)]
            await sub.ack(prefix)
            await sub.close()

            acked = set(numbers(prefix))
            again = await s.subscribe(await s.open(), [channel], group)
            got = await s.consume(again, set(sent) - acked)
            got += await s.expect_quiet(again, self.quiet_period)
            back = acked & set(numbers(got))
            assert not back, f"acked and committed, yet delivered again: {sorted(back)}"

    @pytest.mark.asyncio
    async def test_settle_out_of_order_commits_contiguously(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("order-settle"), s.name("group")
            await s.publish(transport, channel, range(10), key=lambda n: "one-partition")
            sub = await s.subscribe(transport, [channel], group)
            fetched = {number(d): d for d in await s.consume(sub, range(10), ack=False)}
            for n in (5, 9, 1, 0, 2, 4, 6, 7, 8):  # 3 stays unsettled
                await sub.ack([fetched[n]])
            await sub.close()

            again = await s.subscribe(await s.open(), [channel], group)
            got = await s.consume(again, [3])
            got += await s.expect_quiet(again, self.quiet_period)
            back = {0, 1, 2} & set(numbers(got))
            assert not back, f"messages before the unsettled one came again: {sorted(back)}"

    # -- replay ------------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_replay_from_beginning(self, transport_url: str, features: Features) -> None:
        self.require(features, "replay")
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("replay"), s.name("group")
            sent = await s.publish(transport, channel, range(12))
            sub = await s.subscribe(transport, [channel], group)
            await s.consume(sub, sent)
            await sub.close()

            resumed = await s.subscribe(transport, [channel], group)
            nothing = await s.expect_quiet(resumed, self.quiet_period)
            assert not nothing, f"consumed messages came again: {short(numbers(nothing))}"
            await resumed.close()

            replay = await s.subscribe(transport, [channel], group, start=Start.beginning())
            got = await s.consume(replay, sent)
            assert set(numbers(got)) == set(sent)

    @pytest.mark.asyncio
    async def test_replay_from_offsets(self, transport_url: str, features: Features) -> None:
        self.require(features, "replay")
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("replay-at"), s.name("group")
            sent = await s.publish(transport, channel, range(10), key=lambda n: "one-partition")
            sub = await s.subscribe(transport, [channel], group)
            got = sorted(await s.consume(sub, sent), key=lambda d: d.offset)
            await sub.close()
            assert numbers(got) == sent
            partition = got[0].partition

            start = Start.at({channel: {partition: got[4].offset}})
            replay = await s.subscribe(transport, [channel], group, start=start)
            again = await s.consume(replay, range(4, 10))
            again += await s.expect_quiet(replay, self.quiet_period)
            assert set(numbers(again)) == set(range(4, 10)), short(numbers(again))

    @pytest.mark.asyncio
    async def test_replay_from_time(self, transport_url: str, features: Features) -> None:
        self.require(features, "replay", "replay_from_time")
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("replay-time"), s.name("group")
            await s.publish(transport, channel, range(6))
            await asyncio.sleep(0.25)
            middle = time.time()
            await asyncio.sleep(0.25)
            later = await s.publish(transport, channel, range(6, 12))
            sub = await s.subscribe(transport, [channel], group)
            await s.consume(sub, range(12))
            await sub.close()

            replay = await s.subscribe(transport, [channel], group, start=Start.at_time(middle))
            got = await s.consume(replay, later)
            got += await s.expect_quiet(replay, self.quiet_period)
            assert set(numbers(got)) == set(later), short(numbers(got))
            early = [describe(d) for d in got if d.timestamp < middle]
            assert not early, f"timestamps before the replay time: {early}"

    # -- closing -----------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_closed_subscription_raises(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("closed"), s.name("group")
            await s.publish(transport, channel, range(3))
            sub = await s.subscribe(transport, [channel], group)
            a, b, c = await s.consume(sub, range(3), ack=False)
            await sub.close()
            await sub.close()
            with pytest.raises(TransportClosed):
                await sub.fetch(1, 0)
            with pytest.raises(TransportClosed):
                await sub.ack([a])
            with pytest.raises(TransportClosed):
                await sub.nack(b, 0)
            with pytest.raises(TransportClosed):
                await sub.dead_letter(c, DeadLetterReason(reason="rejected", message="closed"))

    @pytest.mark.asyncio
    async def test_closed_transport_raises(self, transport_url: str) -> None:
        async with self.scenario(transport_url) as s:
            transport = await s.open()
            channel, group = s.name("closed"), s.name("group")
            sub = await s.subscribe(transport, [channel], group)
            await transport.close()
            await transport.close()
            with pytest.raises(TransportClosed):
                await sub.fetch(1, 0)
            with pytest.raises(TransportClosed):
                await s.publish(transport, channel, [1])
            with pytest.raises(TransportClosed):
                await transport.subscribe([channel], group)
            with pytest.raises(TransportClosed):
                await transport.ensure_channel(channel)
