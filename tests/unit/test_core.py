"""The core: ids, typed events, the envelope and its CloudEvents headers, the JSON codec."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from nervus.codecs import JSON_CODEC
from nervus.core import (
    REGISTRY,
    Envelope,
    Event,
    _clock,
    _ids,
    channel_of,
    new_id,
    type_name,
    uuid7,
    uuid7_time_ms,
)
from nervus.errors import ConfigurationError, DecodeError, UnknownEventType

pytestmark = pytest.mark.unit


class ParcelSent(Event, type="test.parcel.sent.v1", key="parcel_id"):
    parcel_id: str
    grams: int


class ParcelLost(Event, type="test.parcel.lost.v1", channel="lost-and-found"):
    parcel_id: str


def test_uuid7_layout_order_and_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert ids == sorted(ids), "ids of one process must be strictly increasing"
    assert len(set(ids)) == len(ids)
    assert before <= uuid7_time_ms(ids[0]) <= uuid7_time_ms(str(ids[-1])) <= after + 1


def test_new_id_is_the_canonical_text_of_a_uuid7() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for text in ids[:2000]:
        parsed = uuid.UUID(text)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    reader, writer = os.pipe()
    new_id()  # the parent has random bytes buffered before the fork
    pid = os.fork()
    if pid == 0:  # the child: write its ids and leave at once
        os.write(writer, "\n".join(new_id() for _ in range(200)).encode())
        os._exit(0)
    os.close(writer)
    mine = {new_id() for _ in range(200)}
    with os.fdopen(reader) as pipe:
        theirs = set(pipe.read().split())
    os.waitpid(pid, 0)
    assert len(theirs) == 200
    assert not mine & theirs
    assert {t[19:] for t in theirs}.isdisjoint({m[19:] for m in mine}), "random bits repeat"


@pytest.fixture
def fresh_ids() -> Iterator[None]:
    """Ids made on a clock of the test's own, then on the real clock again."""
    _ids._forget_state()
    yield
    _ids._forget_state()


@pytest.mark.usefixtures("fresh_ids")
def test_ids_increase_when_the_clock_stands_still_or_steps_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = 1_700_000_000_000_000_000
    monkeypatch.setattr(_ids, "time_ns", lambda: now)
    ids = [new_id() for _ in range(5000)]  # more than one millisecond's counter holds
    now -= 5_000_000_000
    ids += [new_id() for _ in range(100)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert uuid7_time_ms(ids[0]) == 1_700_000_000_000
    assert uuid7_time_ms(ids[-1]) == 1_700_000_000_001, "the next millisecond is borrowed"
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)


def test_rfc3339_now_is_utc_with_microseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    moments = [
        1_700_000_000_123_456_789,
        1_700_000_000_123_999_999,
        1_700_000_000_999_999_999,
        1_700_000_001_000_000_000,
        1_699_999_999_999_000_500,  # the clock stepped back
        0,
        4_102_444_800_000_001_000,
    ]
    for ns in moments:
        monkeypatch.setattr(_clock, "time_ns", lambda ns=ns: ns)
        expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)
        assert _clock.rfc3339_now() == expected.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_event_declaration_gives_type_channel_and_key() -> None:
    sent = ParcelSent(parcel_id="p-1", grams=250)
    assert type_name(ParcelSent) == "test.parcel.sent.v1"
    assert channel_of(ParcelSent) == "test.parcel"
    assert channel_of(ParcelLost) == "lost-and-found"
    assert sent.partition_key() == "p-1"
    assert ParcelLost(parcel_id="x").partition_key() is None
    assert REGISTRY.resolve("test.parcel.sent.v1") is ParcelSent
    with pytest.raises(AttributeError):
        sent.grams = 3  # type: ignore[misc]  # events are immutable


def test_bad_declarations_are_reported_with_the_fix() -> None:
    with pytest.raises(ConfigurationError) as err:

        class Bad(Event, type="Not A Name", key="missing"):
            value: int

    text = str(err.value)
    assert "type='Not A Name'" in text and "key='missing' is not a field" in text
    with pytest.raises(ConfigurationError, match="declared twice"):

        class Impostor(Event, type="test.parcel.sent.v1"):
            parcel_id: str


def test_unknown_type_names_the_type_and_lists_known_ones() -> None:
    with pytest.raises(UnknownEventType, match=r"'test\.parcel\.vanished\.v1'.*test\.parcel\.sent"):
        REGISTRY.resolve("test.parcel.vanished.v1")


def test_envelope_headers_round_trip_in_binary_content_mode() -> None:
    data = JSON_CODEC.encode(ParcelSent(parcel_id="p-9", grams=10))
    env = Envelope.new(
        type="test.parcel.sent.v1",
        source="/nervus/post",
        data=data,
        subject="p-9",
        partitionkey="p-9",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    headers = env.to_headers()
    assert headers["ce_specversion"] == "1.0"
    assert headers["ce_id"] == env.id and uuid.UUID(env.id).version == 7
    assert headers["ce_type"] == "test.parcel.sent.v1"
    assert headers["content-type"] == "application/json"
    assert headers["ce_partitionkey"] == "p-9"
    assert headers["traceparent"].startswith("00-0af7")
    assert headers["ce_time"].endswith("Z")
    assert "ce_causationid" not in headers, "a first message has no cause"
    assert headers["ce_correlationid"] == env.id, "a first message starts its own conversation"
    assert Envelope.from_headers(headers, data) == env


def test_correlation_and_causation_follow_the_cause() -> None:
    first = Envelope.new(type="test.parcel.sent.v1", source="/a", data=b"{}", traceparent="tp")
    second = Envelope.new(type="test.parcel.lost.v1", source="/b", data=b"{}", cause=first)
    third = Envelope.new(type="test.parcel.lost.v1", source="/c", data=b"{}", cause=second)
    assert second.correlationid == first.id and second.causationid == first.id
    assert third.correlationid == first.id and third.causationid == second.id
    assert third.traceparent == "tp"


def test_missing_required_header_is_named() -> None:
    with pytest.raises(KeyError, match="ce_type"):
        Envelope.from_headers({"ce_id": "1", "ce_source": "/x"}, b"{}")


def test_codec_decode_error_names_the_type_and_the_problem() -> None:
    assert JSON_CODEC.decode(b'{"parcel_id":"a","grams":1}', ParcelSent) == ParcelSent(
        parcel_id="a", grams=1
    )
    with pytest.raises(DecodeError, match=r"test\.parcel\.sent\.v1.*grams"):
        JSON_CODEC.decode(b'{"parcel_id":"a"}', ParcelSent, type_name="test.parcel.sent.v1")
    with pytest.raises(DecodeError):
        JSON_CODEC.decode(b'{"parcel_id": ', ParcelSent)
    assert isinstance(msgspec.json.decode(JSON_CODEC.encode(ParcelLost(parcel_id="z"))), dict)


def test_url_options_report_every_problem_without_the_password() -> None:
    from nervus.transports import parse_options, redact

    class Options(msgspec.Struct):
        partitions: int = 8
        lease_seconds: float = 10.0

        def validate(self) -> list[str]:
            return [] if self.lease_seconds > 0 else ["lease_seconds must be above 0"]

    url = "x://user:s3cret@host:1/db?partitions=many&lease_seconds=-1&colour=red"
    with pytest.raises(ConfigurationError) as err:
        parse_options(url, Options, key="NERVUS_TRANSPORT")
    text = str(err.value)
    assert "s3cret" not in text
    assert "user:***@host:1" in text
    assert "unknown option 'colour'" in text
    assert "partitions='many'" in text
    assert "lease_seconds must be above 0" in text
    assert redact("x://host/db") == "x://host/db"
