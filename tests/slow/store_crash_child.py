"""A process of the store crash test: an appender or a projector, killed at random.

    python tests/slow/store_crash_child.py append STORE_URL NAME EVENTS STREAMS
    python tests/slow/store_crash_child.py project STORE_URL
    python tests/slow/store_crash_child.py relay STORE_URL TRANSPORT_URL

An appender owns ``STREAMS`` streams (``NAME-0`` ...) and appends to them, side by
side (so its appends meet in group commits), until each holds ``EVENTS`` events;
event ``k`` of a stream carries ``{"seq": k}`` and goes at version ``k + 1`` with
that expected version, so after a restart it carries on from what the store says
and neither skips nor repeats an event. The projector keeps a ``totals`` read model
(events, sum of seq, last seq per stream) until it is killed. The relay publishes
the store's log to the transport until it is killed.
"""

from __future__ import annotations

import asyncio
import sys

from nervus import Envelope, Event
from nervus.codecs import JSON_CODEC
from nervus.domain import Projection, ProjectionRunner, ReadModelTransaction, handles
from nervus.errors import ConcurrencyError
from nervus.runtime._relay import Relay
from nervus.storage import store_from_url
from nervus.transports import from_url


class Counted(Event, type="crash.stream.counted.v1"):
    seq: int


class Totals(Projection):
    name = "totals"
    tables = {
        "totals": "CREATE TABLE {totals} (stream_id TEXT PRIMARY KEY, events INTEGER NOT NULL, "
        "seq_sum INTEGER NOT NULL, last_seq INTEGER NOT NULL)"
    }

    @handles
    async def counted(self, event: Counted, tx: ReadModelTransaction) -> None:
        assert tx.recorded is not None
        stream = tx.recorded.stream_id
        changed = await tx.execute(
            "UPDATE {totals} SET events = events + 1, seq_sum = seq_sum + ?, last_seq = ? "
            "WHERE stream_id = ?",
            event.seq,
            event.seq,
            stream,
        )
        if not changed:
            await tx.execute(
                "INSERT INTO {totals} VALUES (?, 1, ?, ?)", stream, event.seq, event.seq
            )


async def append(url: str, name: str, events: int, streams: int) -> None:
    async with store_from_url(url) as store:

        async def fill(stream_id: str) -> None:
            while True:
                version = await store.stream_version(stream_id)
                if version >= events:
                    return
                envelope = Envelope.new(
                    type="crash.stream.counted.v1",
                    source=name,
                    data=JSON_CODEC.encode(Counted(seq=version)),
                )
                try:
                    await store.append(stream_id, [envelope], version)
                except ConcurrencyError:
                    continue  # cannot happen with one writer per stream; read again

        await asyncio.gather(*(fill(f"{name}-{n}") for n in range(streams)))


async def project(url: str) -> None:
    async with store_from_url(url) as store:
        await ProjectionRunner(store, Totals(), batch=50).run()


async def relay(url: str, transport_url: str) -> None:
    async with store_from_url(url) as store, from_url(transport_url) as transport:
        await Relay(store, transport.publish, batch=40, lease_seconds=1.0).run()


def main() -> None:
    role, url, *rest = sys.argv[1:]
    if role == "append":
        name, events, streams = rest
        asyncio.run(append(url, name, int(events), int(streams)))
    elif role == "project":
        asyncio.run(project(url))
    elif role == "relay":
        asyncio.run(relay(url, rest[0]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
