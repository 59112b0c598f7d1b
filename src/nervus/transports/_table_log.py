"""What the log transports kept in SQL tables (``sqlite``, ``postgres``) share:
the handles of their deliveries and how a fetched batch is admitted."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nervus.transports._contract import Delivery, OffsetTracker


class OwnedPartition:
    """A partition this member owns; also the ``handle`` of its deliveries, so a
    delivery from an earlier ownership of the same partition is recognised."""

    __slots__ = ("channel", "cid", "cursor", "part")

    def __init__(self, channel: str, cid: int, part: int, cursor: int) -> None:
        self.channel = channel
        self.cid = cid
        self.part = part
        self.cursor = cursor


class RetryHandle:
    """The ``handle`` of a delivery read from the retries table."""

    __slots__ = ("cid",)

    def __init__(self, cid: int) -> None:
        self.cid = cid


def admit(
    retries: Iterable[Delivery],
    batches: Iterable[tuple[OwnedPartition, list[Delivery]]],
    owned: Mapping[tuple[str, int], OwnedPartition],
    tracker: OffsetTracker,
    retries_in_flight: set[tuple[int, int, int]],
) -> list[Delivery]:
    """The deliveries of one read that may be handed out: those of partitions still
    owned (by the same ownership), not read already by another fetch; records them
    in ``tracker`` and ``retries_in_flight`` and moves each partition's cursor."""
    out: list[Delivery] = []
    for d in retries:
        if (d.channel, d.partition) in owned:
            assert isinstance(d.handle, RetryHandle)
            retries_in_flight.add((d.handle.cid, d.partition, d.offset))
            out.append(d)
    fetched = tracker.fetched
    for handle, batch in batches:
        channel, part = handle.channel, handle.part
        if owned.get((channel, part)) is not handle:
            continue  # revoked while reading
        if batch[0].offset < handle.cursor:  # another fetch read some of these
            batch = [d for d in batch if d.offset >= handle.cursor]
            if not batch:
                continue
        for d in batch:
            fetched(channel, part, d.offset)
        handle.cursor = batch[-1].offset + 1
        out.extend(batch)
    return out
