"""How a partition of a table log turns settled deliveries into the position to commit."""

from __future__ import annotations

import pytest

from nervus.transports import Delivery
from nervus.transports._table_log import OwnedPartition, RetryHandle, admit, settle_in_log

pytestmark = pytest.mark.unit


def read(handle: OwnedPartition, offsets: list[int]) -> list[Delivery]:
    batch = [
        Delivery(handle.channel, handle.part, off, None, {}, b"", handle=handle) for off in offsets
    ]
    return admit([], [(handle, batch)], {(handle.channel, handle.part): handle}, set())


def owned(handle: OwnedPartition) -> dict[tuple[str, int], OwnedPartition]:
    return {(handle.channel, handle.part): handle}


def test_in_order_settlement_moves_the_position_to_after_the_last() -> None:
    h = OwnedPartition("c", 7, 0, 10)
    batch = read(h, [10, 11, 12])
    positions: dict[tuple[int, int], int] = {}
    settle_in_log(batch[:2], owned(h), positions, lambda d: None)
    assert positions == {(7, 0): 12}
    settle_in_log(batch[2:], owned(h), positions, lambda d: None)
    assert positions == {(7, 0): 13}


def test_out_of_order_settlement_waits_for_the_lowest() -> None:
    h = OwnedPartition("c", 7, 0, 0)
    d0, d1, d2, d3 = read(h, [0, 1, 2, 3])
    positions: dict[tuple[int, int], int] = {}
    settle_in_log([d2, d1, d3], owned(h), positions, lambda d: None)
    assert positions == {}
    settle_in_log([d0], owned(h), positions, lambda d: None)
    assert positions == {(7, 0): 4}
    settle_in_log([d0], owned(h), positions, lambda d: None)  # settled again: nothing moves
    assert h.low == 4 and not h.done


def test_rows_missing_from_a_read_do_not_hold_the_position() -> None:
    h = OwnedPartition("c", 7, 0, 0)
    first = read(h, [0, 1])
    later = read(h, [5, 6, 8])  # 2-4 and 7 were gone before they were read
    positions: dict[tuple[int, int], int] = {}
    settle_in_log(later, owned(h), positions, lambda d: None)
    assert positions == {}
    settle_in_log(first, owned(h), positions, lambda d: None)
    assert positions == {(7, 0): 9}


def test_a_read_after_missing_rows_with_nothing_pending_starts_there() -> None:
    h = OwnedPartition("c", 7, 0, 3)
    batch = read(h, [9, 10])
    positions: dict[tuple[int, int], int] = {}
    settle_in_log(batch, owned(h), positions, lambda d: None)
    assert positions == {(7, 0): 11}


def test_deliveries_of_an_earlier_ownership_and_retries_are_not_positions() -> None:
    old = OwnedPartition("c", 7, 0, 0)
    batch = read(old, [0, 1])
    new = OwnedPartition("c", 7, 0, 0)
    retry = Delivery("c", 0, 5, None, {}, b"", handle=RetryHandle(7))
    others: list[Delivery] = []
    positions: dict[tuple[int, int], int] = {}
    settle_in_log([*batch, retry], owned(new), positions, others.append)
    assert positions == {}
    assert others == [retry]


def test_a_batch_partly_read_by_another_fetch_is_admitted_from_the_cursor() -> None:
    h = OwnedPartition("c", 7, 0, 0)
    read(h, [0, 1, 2])
    again = read(h, [1, 2, 3, 4])
    assert [d.offset for d in again] == [3, 4]
    assert h.cursor == 5
