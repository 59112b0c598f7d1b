"""What the log transports kept in SQL tables (``sqlite``, ``postgres``) share:
the handles of their deliveries, how a fetched batch is admitted and how settled
deliveries become the positions a member commits."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence

from nervus.transports._contract import Delivery

PartitionKey = tuple[int, int]  # (channel id, partition)


class OwnedPartition:
    """A partition this member owns; also the ``handle`` of its deliveries, so a
    delivery from an earlier ownership of the same partition is recognised.

    It tracks what was read and settled in this ownership, as ``OffsetTracker``
    does for a broker's log but without a record per offset: offsets in a table
    are dense, and every offset in ``[low, cursor)`` was handed out and not settled
    yet, or settled out of order (``done``), or never existed (``gaps``: rows gone
    before they were read). ``low`` is the position to commit: the offset after the
    last one settled in order.
    """

    __slots__ = ("channel", "cid", "cursor", "done", "gaps", "low", "part")

    def __init__(self, channel: str, cid: int, part: int, cursor: int) -> None:
        self.channel = channel
        self.cid = cid
        self.part = part
        self.cursor = cursor  # the next offset to read
        self.low = cursor
        self.done: set[int] = set()
        self.gaps: dict[int, int] = {}  # first missing offset -> first offset after them

    def read(self, batch: Sequence[Delivery]) -> None:
        """``batch`` (in offset order, all at or after ``cursor``) was handed out."""
        first, last = batch[0].offset, batch[-1].offset
        if first > self.cursor:
            if self.low == self.cursor:  # nothing pending: start after the missing rows
                self.low = first
            else:
                self.gaps[self.cursor] = first
        if last - first + 1 != len(batch):  # rows missing inside the batch
            self.done.update(set(range(first, last + 1)) - {d.offset for d in batch})
        self.cursor = last + 1

    def settle(self, offset: int) -> bool:
        """Mark ``offset`` settled; whether ``low`` moved."""
        if offset != self.low:
            if self.low < offset < self.cursor:
                self.done.add(offset)
            return False
        low = offset + 1
        done, gaps = self.done, self.gaps
        while True:
            if low in done:
                done.discard(low)
                low += 1
            elif low in gaps:
                low = gaps.pop(low)
            else:
                break
        self.low = low
        return True


class RetryHandle:
    """The ``handle`` of a delivery read from the retries table."""

    __slots__ = ("cid",)

    def __init__(self, cid: int) -> None:
        self.cid = cid


def admit(
    retries: Iterable[Delivery],
    batches: Iterable[tuple[OwnedPartition, list[Delivery]]],
    owned: Mapping[tuple[str, int], OwnedPartition],
    retries_in_flight: set[tuple[int, int, int]],
) -> list[Delivery]:
    """The deliveries of one read that may be handed out: those of partitions still
    owned (by the same ownership), not read already by another fetch; records them
    in their partition's handle (or ``retries_in_flight``) and moves its cursor."""
    out: list[Delivery] = []
    for d in retries:
        if (d.channel, d.partition) in owned:
            assert isinstance(d.handle, RetryHandle)
            retries_in_flight.add((d.handle.cid, d.partition, d.offset))
            out.append(d)
    for handle, batch in batches:
        if owned.get((handle.channel, handle.part)) is not handle:
            continue  # revoked while reading
        if batch[0].offset < handle.cursor:  # another fetch read some of these
            batch = [d for d in batch if d.offset >= handle.cursor]
            if not batch:
                continue
        handle.read(batch)
        out.extend(batch)
    return out


def settle_in_log(
    deliveries: Sequence[Delivery],
    owned: Mapping[tuple[str, int], OwnedPartition],
    positions: MutableMapping[PartitionKey, int],
    other: Callable[[Delivery], None],
) -> None:
    """Settle ``deliveries``: those read from the log move their partition's position
    (recorded in ``positions`` for the partitions still owned by the same
    ownership); the others (retries, foreign deliveries) go to ``other``."""
    moved: dict[OwnedPartition, None] = {}
    for d in deliveries:
        handle = d.handle
        if type(handle) is OwnedPartition:
            offset = d.offset
            if offset == handle.low and not handle.done and not handle.gaps:
                handle.low = offset + 1  # in order: the common case, inlined
                moved[handle] = None
            elif handle.settle(offset):
                moved[handle] = None
        else:
            other(d)
    for handle in moved:
        if owned.get((handle.channel, handle.part)) is handle:
            positions[(handle.cid, handle.part)] = handle.low
