"""The SQLite transport's own behaviour: settings, channels, offsets, group commit,
retries that survive a restart, retention by age and by size."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nervus.errors import ConfigurationError, TransportClosed, TransportError, TransportUnavailable
from nervus.transports import Delivery, OutgoingMessage, Start, Subscription, from_url
from nervus.transports.sqlite import SqliteSettings, SqliteSubscription, SqliteTransport

pytestmark = pytest.mark.unit


def url_for(path: Path, **options: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"partitions": 4, **options}.items())
    return f"sqlite:///{path}?{query}"


def msg(n: int, key: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(key=key, headers={"n": str(n), "x-text": "é"}, body=f"body-{n}".encode())


@pytest.fixture
async def transport(tmp_path: Path) -> AsyncIterator[SqliteTransport]:
    t = SqliteTransport.from_url(url_for(tmp_path / "log.db", lease_seconds=2))
    await t.connect()
    try:
        yield t
    finally:
        await t.close()


async def drain(sub: Subscription, count: int, *, ack: bool = True) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            batch = await sub.fetch(count - len(got), 0.2)
            got.extend(batch)
            if ack and batch:
                await sub.ack(batch)
    return got


async def quiet(sub: Subscription, seconds: float = 0.2) -> list[Delivery]:
    return list(await sub.fetch(100, seconds))


# -- settings ------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    settings = SqliteSettings(path="x.db")
    assert settings.validate() == []
    assert settings.partitions == 8
    assert settings.synchronous == "full"
    assert settings.heartbeat == settings.lease_seconds / 4


def test_every_bad_option_is_reported_naming_it(tmp_path: Path) -> None:
    url = (
        f"sqlite:///{tmp_path}/x.db?partitions=0&lease_seconds=3&heartbeat_seconds=2"
        "&retention_bytes=-1&poll_interval=0"
    )
    with pytest.raises(ConfigurationError) as info:
        from_url(url, key="NERVUS_TRANSPORT")
    text = "\n".join(info.value.problems)
    for name in ("partitions=0", "heartbeat_seconds=2", "retention_bytes=-1", "poll_interval=0"):
        assert name in text
    assert all(p.startswith("NERVUS_TRANSPORT") for p in info.value.problems)


def test_bad_synchronous_and_unknown_option_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        from_url(f"sqlite:///{tmp_path}/x.db?synchronous=sometimes&partitionz=3")
    text = "\n".join(info.value.problems)
    assert "synchronous='sometimes'" in text
    assert "unknown option 'partitionz'" in text


@pytest.mark.parametrize(
    ("url", "hint"),
    [("sqlite://host/x.db", "no host"), ("sqlite:///:memory:", "memory://"), ("sqlite://", "name")],
)
def test_url_without_a_usable_file_is_refused(url: str, hint: str) -> None:
    with pytest.raises(ConfigurationError, match=hint):
        from_url(url)


def test_relative_and_absolute_paths(tmp_path: Path) -> None:
    relative = SqliteTransport.from_url("sqlite:///data/nervus.db")
    assert relative.settings.path == "data/nervus.db"
    absolute = SqliteTransport.from_url(f"sqlite:///{tmp_path}/n.db")
    assert absolute.path == str(tmp_path / "n.db")


async def test_connect_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "log.db"
    async with SqliteTransport.from_url(url_for(path)) as t:
        await t.publish("c", [msg(1)])
    assert path.exists()


async def test_unusable_path_is_unavailable_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    t = SqliteTransport.from_url(url_for(blocker / "log.db"))
    with pytest.raises(TransportUnavailable, match=r"log\.db"):
        await t.connect()
    blocker.unlink()  # the cause is gone: connecting again works
    await t.connect()
    await t.publish("c", [msg(1)])
    await t.close()


async def test_publish_before_connect_and_after_close(tmp_path: Path) -> None:
    t = SqliteTransport.from_url(url_for(tmp_path / "log.db"))
    with pytest.raises(TransportUnavailable, match="connect"):
        await t.publish("c", [msg(1)])
    await t.connect()
    sub = await t.subscribe(["c"], "g")
    await t.close()
    with pytest.raises(TransportClosed):
        await t.publish("c", [msg(1)])
    with pytest.raises(TransportClosed):
        await sub.fetch(1, 0)


async def test_file_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with SqliteTransport.from_url(url_for(path)):
        pass
    conn = sqlite3.connect(path)
    conn.execute("UPDATE nervus_meta SET value = '999' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    t = SqliteTransport.from_url(url_for(path))
    with pytest.raises(Exception, match="schema version 999"):
        await t.connect()
    await t.close()


# -- channels, offsets, publishing ---------------------------------------------------


async def test_existing_partition_count_wins_across_transports(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with SqliteTransport.from_url(url_for(path)) as first:
        assert await first.ensure_channel("orders", 3) == 3
        assert await first.ensure_channel("orders", 12) == 3
        assert await first.ensure_channel("defaulted") == 4
    async with SqliteTransport.from_url(url_for(path, partitions=16)) as second:
        assert await second.ensure_channel("orders") == 3
        assert await second.ensure_channel("orders", 5) == 3
        assert await second.ensure_channel("new") == 16


async def test_offsets_are_dense_per_partition_and_keys_stay_put(
    transport: SqliteTransport,
) -> None:
    await transport.ensure_channel("c", 3)
    for start in range(0, 30, 10):
        await transport.publish("c", [msg(n, key=f"k{n % 5}") for n in range(start, start + 10)])
    sub = await transport.subscribe(["c"], "g")
    got = await drain(sub, 30)
    by_partition: dict[int, list[int]] = {}
    partition_of: dict[str | None, int] = {}
    for d in got:
        by_partition.setdefault(d.partition, []).append(d.offset)
        assert partition_of.setdefault(d.key, d.partition) == d.partition
        assert d.headers == {"n": d.headers["n"], "x-text": "é"}
        assert d.body == f"body-{d.headers['n']}".encode()
        assert d.timestamp > 0
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets)))


async def test_keyless_messages_spread_round_robin(transport: SqliteTransport) -> None:
    await transport.publish("c", [msg(n) for n in range(8)])
    sub = await transport.subscribe(["c"], "g")
    got = await drain(sub, 8)
    assert sorted(d.partition for d in got) == [0, 0, 1, 1, 2, 2, 3, 3]


async def test_concurrent_publishes_share_transactions(transport: SqliteTransport) -> None:
    await transport.ensure_channel("c")
    before = transport.writer.transactions
    await asyncio.gather(*(transport.publish("c", [msg(n, key="k")]) for n in range(100)))
    assert transport.writer.transactions - before < 10
    sub = await transport.subscribe(["c"], "g")
    got = await drain(sub, 100)
    assert [int(d.headers["n"]) for d in got] == list(range(100))


async def test_fetch_wakes_on_a_local_publish(transport: SqliteTransport) -> None:
    sub = await transport.subscribe(["c"], "g")
    waiting = asyncio.create_task(sub.fetch(10, 5.0))
    await asyncio.sleep(0.05)
    await transport.publish("c", [msg(1)])
    async with asyncio.timeout(2):
        got = await waiting
    assert [d.headers["n"] for d in got] == ["1"]


# -- groups, commits, retries ----------------------------------------------------------


async def test_committed_position_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with SqliteTransport.from_url(url_for(path)) as t:
        await t.publish("c", [msg(n, key="k") for n in range(10)])
        sub = await t.subscribe(["c"], "g")
        first = await drain(sub, 4, ack=False)
        await sub.ack(first[:3])  # 0..2 settled, 3 unsettled
        await sub.close()
    async with SqliteTransport.from_url(url_for(path)) as t:
        sub = await t.subscribe(["c"], "g")
        rest = await drain(sub, 7)
        assert [int(d.headers["n"]) for d in rest] == list(range(3, 10))
        assert await quiet(sub) == []


async def test_out_of_order_acks_commit_only_the_contiguous_prefix(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with SqliteTransport.from_url(url_for(path, partitions=1)) as t:
        await t.publish("c", [msg(n) for n in range(5)])
        sub = await t.subscribe(["c"], "g")
        got = await drain(sub, 5, ack=False)
        await sub.ack([got[0], got[2], got[4]])
    async with SqliteTransport.from_url(url_for(path, partitions=1)) as t:
        sub = await t.subscribe(["c"], "g")
        again = await drain(sub, 4)
        assert [d.offset for d in again] == [1, 2, 3, 4]


async def test_nack_survives_a_restart_and_comes_back_as_next_attempt(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    async with SqliteTransport.from_url(url_for(path, partitions=1)) as t:
        await t.publish("c", [msg(n) for n in range(3)])
        sub = await t.subscribe(["c"], "g")
        got = await drain(sub, 3, ack=False)
        nacked_at = time.time()
        await sub.nack(got[1], 0.3)
        await sub.ack([got[0], got[2]])
    async with SqliteTransport.from_url(url_for(path, partitions=1)) as t:
        sub = await t.subscribe(["c"], "g")
        again = await drain(sub, 1, ack=False)
        assert time.time() - nacked_at >= 0.3
        assert (again[0].offset, again[0].attempt) == (1, 2)
        await sub.nack(again[0], 0)
        third = await drain(sub, 1)
        assert (third[0].offset, third[0].attempt) == (1, 3)
        assert await quiet(sub) == []


async def test_members_split_partitions_and_a_leaver_hands_over(
    transport: SqliteTransport,
) -> None:
    await transport.ensure_channel("c", 4)
    a = await transport.subscribe(["c"], "g")
    b = await transport.subscribe(["c"], "g")
    async with asyncio.timeout(10):  # the channel is empty: fetch only waits
        while not (a.assignment() and b.assignment() and len(a.assignment() | b.assignment()) == 4):
            assert await a.fetch(1, 0.05) == []
    assert not a.assignment() & b.assignment()
    await a.close()
    async with asyncio.timeout(10):
        while len(b.assignment()) < 4:
            assert await b.fetch(1, 0.05) == []


async def test_replay_from_time_uses_accept_timestamps(transport: SqliteTransport) -> None:
    await transport.publish("c", [msg(n, key="k") for n in range(5)])
    await asyncio.sleep(0.05)
    middle = time.time()
    await asyncio.sleep(0.05)
    await transport.publish("c", [msg(n, key="k") for n in range(5, 8)])
    sub = await transport.subscribe(["c"], "g", start=Start.at_time(middle))
    got = await drain(sub, 3)
    assert [int(d.headers["n"]) for d in got] == [5, 6, 7]


# -- retention -------------------------------------------------------------------------


async def test_retention_by_age_keeps_offsets_growing(tmp_path: Path) -> None:
    url = url_for(tmp_path / "log.db", partitions=1, retention_seconds=0.2)
    async with SqliteTransport.from_url(url) as t:
        await t.publish("c", [msg(n) for n in range(5)])
        await asyncio.sleep(0.3)
        await t.publish("c", [msg(n) for n in range(5, 8)])
        assert await t.apply_retention() == 5
        sub = await t.subscribe(["c"], "g")
        got = await drain(sub, 3)
        assert [(d.offset, d.headers["n"]) for d in got] == [(5, "5"), (6, "6"), (7, "7")]
        await asyncio.sleep(0.3)
        assert await t.apply_retention() == 3
        await t.publish("c", [msg(8)])
        after = await drain(sub, 1)
        assert after[0].offset == 8  # offsets are never reused


async def test_retention_by_size_keeps_the_newest(tmp_path: Path) -> None:
    url = url_for(tmp_path / "log.db", partitions=1, retention_bytes=2000)
    async with SqliteTransport.from_url(url) as t:
        big = [OutgoingMessage(None, {"n": str(n)}, bytes(300)) for n in range(20)]
        await t.publish("c", big)
        deleted = await t.apply_retention()
        sub = await t.subscribe(["c"], "g")
        got = await drain(sub, 20 - deleted)
        assert await quiet(sub) == []
        kept = [int(d.headers["n"]) for d in got]
        assert kept == list(range(20 - len(kept), 20))
        assert 0 < len(kept) * 300 <= 2000
        assert (len(kept) + 1) * 310 > 2000  # nothing deleted that fitted
        assert await t.apply_retention() == 0


async def test_retention_runs_periodically(tmp_path: Path) -> None:
    url = url_for(tmp_path / "log.db", partitions=1, retention_seconds=0.1, retention_interval=0.05)
    async with SqliteTransport.from_url(url) as t:
        await t.publish("c", [msg(n) for n in range(3)])
        sub = await t.subscribe(["c"], "g", start=Start.beginning())
        await asyncio.sleep(0.4)
        assert await quiet(sub, 0.1) == []


async def test_replay_from_end_skips_what_exists(transport: SqliteTransport) -> None:
    await transport.publish("c", [msg(n) for n in range(5)])
    sub = await transport.subscribe(["c"], "g", start=Start.end())
    assert await quiet(sub) == []
    await transport.publish("c", [msg(5)])
    got = await drain(sub, 1)
    assert got[0].headers["n"] == "5"


async def test_a_failing_write_does_not_undo_the_others(transport: SqliteTransport) -> None:
    await transport.ensure_channel("c")

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO nervus_channels (id, name, partitions, created) VALUES (1, 'x', 1, 0)"
        )

    results = await asyncio.gather(
        transport.publish("c", [msg(1, key="k")]),
        transport.writer.submit(broken),
        transport.publish("c", [msg(2, key="k")]),
        return_exceptions=True,
    )
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], TransportError)
    assert "UNIQUE" in str(results[1])
    sub = await transport.subscribe(["c"], "g")
    got = await drain(sub, 2)
    assert [d.headers["n"] for d in got] == ["1", "2"]


async def test_a_member_whose_lease_lapsed_fetches_nothing_until_renewed(
    tmp_path: Path,
) -> None:
    url = url_for(tmp_path / "log.db", lease_seconds=0.3, heartbeat_seconds=0.05)
    async with SqliteTransport.from_url(url) as t:
        await t.publish("c", [msg(n) for n in range(4)])
        sub = await t.subscribe(["c"], "g")
        assert isinstance(sub, SqliteSubscription)
        lease_task = sub._lease_task
        assert lease_task is not None
        lease_task.cancel()  # as if the process stalled: no more renewals
        await asyncio.sleep(0.4)
        assert await sub.fetch(10, 0.05) == []
        await sub._renew()  # renewing says what is still owned
        assert len(await drain(sub, 4)) == 4
