"""OffsetTracker: out-of-order settlement becomes a contiguous commit position."""

from __future__ import annotations

import random

import pytest

from nervus.transports import OffsetTracker

pytestmark = pytest.mark.unit


def test_in_order_settlement_moves_the_position_each_time() -> None:
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.fetched("c", 0, offset)
    assert [tracker.settle("c", 0, o) for o in range(3)] == [1, 2, 3]
    assert tracker.in_flight() == 0


def test_position_waits_for_the_lowest_unsettled_offset() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.fetched("c", 0, offset)
    assert tracker.settle("c", 0, 3) is None
    assert tracker.settle("c", 0, 1) is None
    assert tracker.settle("c", 0, 2) is None
    assert tracker.in_flight() == 5
    assert tracker.settle("c", 0, 0) == 4  # 0..3 done, 4 still out
    assert tracker.in_flight() == 1
    assert tracker.settle("c", 0, 4) == 5


def test_gaps_in_fetched_offsets_are_stepped_over() -> None:
    tracker = OffsetTracker()
    for offset in (10, 12, 15):
        tracker.fetched("c", 0, offset)
    assert tracker.settle("c", 0, 12) is None
    assert tracker.settle("c", 0, 10) == 13
    assert tracker.settle("c", 0, 15) == 16


def test_partitions_and_channels_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.fetched("a", 0, 0)
    tracker.fetched("a", 1, 0)
    tracker.fetched("b", 0, 7)
    assert tracker.settle("a", 1, 0) == 1
    assert tracker.settle("b", 0, 7) == 8
    assert tracker.in_flight() == 1
    assert tracker.settle("a", 0, 0) == 1


def test_settling_what_was_never_fetched_moves_nothing() -> None:
    tracker = OffsetTracker()
    assert tracker.settle("c", 0, 0) is None
    tracker.fetched("c", 0, 0)
    assert tracker.settle("c", 1, 0) is None
    assert tracker.in_flight() == 1


def test_forget_drops_a_revoked_partition() -> None:
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.fetched("c", 0, offset)
        tracker.fetched("c", 1, offset)
    assert tracker.settle("c", 0, 1) is None
    tracker.forget("c", 0)
    assert tracker.in_flight() == 3
    assert tracker.settle("c", 0, 0) is None  # the partition's state is gone
    # Owned again later: it starts afresh from what the new owner fetches.
    tracker.fetched("c", 0, 1)
    assert tracker.settle("c", 0, 1) == 2


def test_fetching_more_after_a_partial_commit() -> None:
    tracker = OffsetTracker()
    tracker.fetched("c", 0, 0)
    tracker.fetched("c", 0, 1)
    assert tracker.settle("c", 0, 0) == 1
    tracker.fetched("c", 0, 2)
    assert tracker.settle("c", 0, 2) is None
    assert tracker.settle("c", 0, 1) == 3


@pytest.mark.parametrize("seed", range(20))
def test_position_never_passes_an_unsettled_offset(seed: int) -> None:
    rng = random.Random(seed)
    offsets = sorted(rng.sample(range(200), 60))
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.fetched("c", 3, offset)
    order = offsets[:]
    rng.shuffle(order)
    unsettled = set(offsets)
    committed = 0
    for offset in order:
        unsettled.discard(offset)
        position = tracker.settle("c", 3, offset)
        lowest = min(unsettled) if unsettled else offsets[-1] + 1
        if position is not None:
            assert position > committed
            committed = position
        # The position is right after the last offset below the lowest unsettled one.
        below = [o for o in offsets if o < lowest]
        assert committed == (below[-1] + 1 if below else 0)
        # Held back: every fetched offset from the lowest unsettled one on.
        assert tracker.in_flight() == len([o for o in offsets if o >= lowest])
    assert committed == offsets[-1] + 1
    assert tracker.in_flight() == 0
