"""Keyed concurrency and the retry policy, without any transport."""

from __future__ import annotations

import asyncio
import random

import pytest

from nervus.runtime import KeyedDispatcher, RetryPolicy

pytestmark = pytest.mark.unit


class Probe:
    """Records the order items run in and how many run at once, overall and per key."""

    def __init__(self, seed: int = 7) -> None:
        self.order: dict[str | None, list[int]] = {}
        self.running: dict[str | None, int] = {}
        self.now = 0
        self.peak = 0
        self.peak_per_key = 0
        self.rand = random.Random(seed)

    async def handle(self, item: tuple[str | None, int]) -> None:
        key, n = item
        self.now += 1
        self.running[key] = self.running.get(key, 0) + 1
        self.peak = max(self.peak, self.now)
        if key is not None:
            self.peak_per_key = max(self.peak_per_key, self.running[key])
        for _ in range(self.rand.randint(0, 3)):
            await asyncio.sleep(0)
        self.order.setdefault(key, []).append(n)
        self.running[key] -= 1
        self.now -= 1


async def test_one_at_a_time_per_key_in_submission_order_and_parallel_across_keys() -> None:
    probe = Probe()
    dispatcher: KeyedDispatcher[tuple[str | None, int]] = KeyedDispatcher(
        probe.handle, max_workers=64
    )
    keys = [f"k{i}" for i in range(10)]
    for n in range(500):
        key = keys[probe.rand.randrange(len(keys))]
        dispatcher.submit(key, (key, n))
    async with asyncio.timeout(5):
        await dispatcher.wait_idle()
    assert dispatcher.pending == 0
    assert dispatcher.active_keys == 0
    assert sum(len(v) for v in probe.order.values()) == 500
    for key, seen in probe.order.items():
        assert seen == sorted(seen), key
    assert probe.peak_per_key == 1
    assert probe.peak > 1  # different keys overlapped
    await dispatcher.close()


async def test_keyless_items_run_in_parallel_up_to_the_worker_bound() -> None:
    gate = asyncio.Event()
    started = 0

    async def handle(item: int) -> None:
        nonlocal started
        started += 1
        await gate.wait()

    dispatcher: KeyedDispatcher[int] = KeyedDispatcher(handle, max_workers=5)
    for n in range(20):
        dispatcher.submit(None, n)
    for _ in range(10):
        await asyncio.sleep(0)
    assert started == 5  # bounded by the workers, the rest wait in the queue
    assert dispatcher.pending == 20
    gate.set()
    async with asyncio.timeout(5):
        await dispatcher.wait_idle()
    assert started == 20
    await dispatcher.close()


async def test_a_raising_item_is_logged_and_the_key_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[int] = []

    async def handle(item: int) -> None:
        if item == 1:
            raise RuntimeError("boom")
        done.append(item)

    dispatcher: KeyedDispatcher[int] = KeyedDispatcher(handle, max_workers=2)
    for n in range(4):
        dispatcher.submit("same", n)
    async with asyncio.timeout(5):
        await dispatcher.wait_idle()
    assert done == [0, 2, 3]
    assert "unexpected error while handling a delivery" in caplog.text
    await dispatcher.close()


async def test_close_cancels_unfinished_items_and_counts_them() -> None:
    cancelled: list[int] = []
    never = asyncio.Event()

    async def handle(item: int) -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.append(item)
            raise

    dispatcher: KeyedDispatcher[int] = KeyedDispatcher(handle, max_workers=4)
    dispatcher.submit("a", 1)
    dispatcher.submit("a", 2)  # queued behind 1
    dispatcher.submit(None, 3)
    for _ in range(5):
        await asyncio.sleep(0)
    async with asyncio.timeout(5):
        left = await dispatcher.close()
    assert left == 3
    assert sorted(cancelled) == [1, 3]
    with pytest.raises(RuntimeError, match="closed"):
        dispatcher.submit(None, 4)


async def test_workers_are_reused_not_created_per_item() -> None:
    async def handle(item: int) -> None:
        await asyncio.sleep(0)

    dispatcher: KeyedDispatcher[int] = KeyedDispatcher(handle, max_workers=3)
    before = len(asyncio.all_tasks())
    for round_ in range(5):
        for n in range(100):
            dispatcher.submit(f"k{n}", round_ * 100 + n)
        async with asyncio.timeout(5):
            await dispatcher.wait_idle()
    assert len(asyncio.all_tasks()) - before <= 3
    await dispatcher.close()


def test_max_workers_must_be_positive() -> None:
    async def handle(item: int) -> None:
        return None

    with pytest.raises(ValueError, match="max_workers=0"):
        KeyedDispatcher(handle, max_workers=0)


# -- retry policy ----------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_max() -> None:
    policy = RetryPolicy(initial=1.0, multiplier=2.0, max=10.0, jitter=0.0)
    assert [policy.backoff(a) for a in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.backoff(10_000) == 10.0  # no overflow


def test_jitter_takes_off_at_most_its_fraction() -> None:
    policy = RetryPolicy(initial=4.0, multiplier=1.0, max=4.0, jitter=0.25)
    assert policy.backoff(1, lambda: 0.0) == 4.0
    assert policy.backoff(1, lambda: 0.5) == 3.5
    rand = random.Random(3)
    delays = {policy.backoff(2, rand.random) for _ in range(200)}
    assert all(3.0 < d <= 4.0 for d in delays)
    assert len(delays) > 100  # spread, not one value


def test_exhausted_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.exhausted(a) for a in (1, 2, 3, 4)] == [False, False, True, True]
