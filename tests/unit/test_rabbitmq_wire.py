"""The RabbitMQ stream reader on the wire: field tables of every type, and frames
cut from whatever pieces the socket hands over (a body split across frames, a frame
split across reads), checked against pamqp, an independent AMQP 0-9-1 codec.

The broker's side is played by feeding the reader the frames pamqp encodes, through
a transport that keeps what the reader writes; no server is needed.
"""

from __future__ import annotations

import asyncio
import random
import struct
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pamqp.decode
import pamqp.encode
import pytest
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat
from rstream import amqp_decoder

from nervus.errors import TransportError, TransportUnavailable
from nervus.transports.rabbitmq._amqp import decode_table, field_table
from nervus.transports.rabbitmq._reader import Consumer, Reader
from nervus.transports.rabbitmq._streams import encode

pytestmark = pytest.mark.unit

WHERE = "amqp://reader:***@broker:5672/orders"


def _field(name: str, kind: str, value: bytes) -> bytes:
    key = name.encode()
    return bytes((len(key),)) + key + kind.encode() + value


def _table(*fields: bytes) -> bytes:
    body = b"".join(fields)
    return struct.pack(">I", len(body)) + body


# -- field tables -------------------------------------------------------------------


def test_every_field_type_decodes() -> None:
    nested = _table(_field("inner", "S", struct.pack(">I", 2) + b"ok"))
    array_body = b"b\xff" + b"S" + struct.pack(">I", 1) + b"z" + b"V" + b"F" + _table()
    data = _table(
        _field("t", "t", b"\x01"),
        _field("f-alse", "t", b"\x00"),
        _field("b", "b", b"\xfe"),
        _field("B", "B", b"\xfe"),
        _field("s", "s", struct.pack(">h", -300)),
        _field("U", "U", struct.pack(">h", -301)),
        _field("u", "u", struct.pack(">H", 65000)),
        _field("I", "I", struct.pack(">i", -70000)),
        _field("i", "i", struct.pack(">I", 4_000_000_000)),
        _field("l", "l", struct.pack(">q", -(2**40))),
        _field("L", "L", struct.pack(">q", 2**62)),
        _field("f", "f", struct.pack(">f", 1.5)),
        _field("d", "d", struct.pack(">d", -2.25)),
        _field("D", "D", b"\x02" + struct.pack(">I", 12345)),
        _field("S", "S", struct.pack(">I", 3) + "é!".encode()),
        _field("S-binary", "S", struct.pack(">I", 2) + b"\xff\xfe"),
        _field("x", "x", struct.pack(">I", 3) + b"\x00\x01\x02"),
        _field("T", "T", struct.pack(">Q", 1_700_000_000)),
        _field("T-ms", "T", struct.pack(">Q", 1_700_000_000_500)),
        _field("F", "F", nested),
        _field("A", "A", struct.pack(">I", len(array_body)) + array_body),
        _field("V", "V", b""),
    )
    table, end = decode_table(data, 0)
    assert end == len(data)
    assert table == {
        "t": True,
        "f-alse": False,
        "b": -2,
        "B": 254,
        "s": -300,
        "U": -301,
        "u": 65000,
        "I": -70000,
        "i": 4_000_000_000,
        "l": -(2**40),
        "L": 2**62,
        "f": 1.5,
        "d": -2.25,
        "D": Decimal("123.45"),
        "S": "é!",
        "S-binary": b"\xff\xfe",
        "x": b"\x00\x01\x02",
        "T": datetime.fromtimestamp(1_700_000_000, UTC),
        "T-ms": datetime.fromtimestamp(1_700_000_000.5, UTC),
        "F": {"inner": "ok"},
        "A": [-1, "z", None, {}],
        "V": None,
    }
    assert [type(table[k]) for k in ("t", "S", "x")] == [bool, str, bytes]


def test_the_stream_offset_is_a_signed_64_bit_value() -> None:
    for offset in (0, 1, 2**31, 2**63 - 1, -1):
        data = _table(_field("x-stream-offset", "l", struct.pack(">q", offset)))
        assert decode_table(data, 0) == ({"x-stream-offset": offset}, len(data))


def test_tables_decode_as_pamqp_decodes_them() -> None:
    headers: dict[str, Any] = {
        "ce_id": "évt-1",
        "small": 7,
        "short": -1000,
        "unsigned": 60000,
        "int": -(2**20),
        "uint": 3_000_000_000,
        "big": 2**40,
        "flag": True,
        "ratio": 1.5,
        "price": Decimal("-1.25"),
        "when": datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
        "nested": {"list": [1, "two", None, {"deep": False}]},
        "raw": bytearray(b"\x00\xff"),
        "nothing": None,
    }
    for data in (pamqp.encode.field_table(headers), field_table(headers)):
        consumed, expected = pamqp.decode.field_table(data)
        decoded, end = decode_table(data, 0)
        assert end == consumed == len(data)
        expected["raw"] = bytes(expected["raw"])
        if decoded["price"] != expected["price"]:
            # pamqp reads the mantissa unsigned, as the specification and RabbitMQ do;
            # its encoder writes it signed: both read the same bytes the same way
            assert decoded["price"] == Decimal(2**32 - 125).scaleb(-2)
            decoded["price"] = expected["price"]
        assert decoded == expected


def test_a_table_at_an_offset_ends_where_it_says() -> None:
    data = b"junk" + _table(_field("a", "S", struct.pack(">I", 1) + b"b")) + b"after"
    table, end = decode_table(data, 4)
    assert table == {"a": "b"}
    assert data[end:] == b"after"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_table(_field("a", "Q", b"\x00")), "unknown field type b'Q'"),
        (struct.pack(">I", 50) + b"\x01a", "runs past"),
        (_table(_field("a", "S", struct.pack(">I", 9) + b"short")), "past its end"),
        (_table(_field("a", "A", struct.pack(">I", 99))), "runs past"),
    ],
)
def test_a_malformed_table_is_refused(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decode_table(data, 0)


def test_a_table_cut_short_is_refused() -> None:
    data = _table(_field("a", "l", struct.pack(">q", 5)))
    with pytest.raises((ValueError, struct.error)):
        decode_table(data[:-3], 0)


# -- the connection -----------------------------------------------------------------


class _Wire(asyncio.Transport):
    """The reader's transport: keeps what it writes; closing it ends the connection."""

    def __init__(self, reader: Reader) -> None:
        super().__init__()
        self.reader = reader
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self._end()

    def is_closing(self) -> bool:
        return self.closed

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.reader.connection_lost, None)

    def sent(self) -> list[tuple[int, object]]:
        """The frames written since the last call, decoded by pamqp: (channel, frame)."""
        data, self.written = bytes(self.written), bytearray()
        frames = []
        while data:
            consumed, channel, value = frame.unmarshal(data)
            frames.append((channel, value))
            data = data[consumed:]
        return frames


def _frames(*values: tuple[int, Any]) -> bytes:
    return b"".join(frame.marshal(value, channel) for channel, value in values)


async def _open(frame_max: int = 4096, heartbeat: int = 0) -> tuple[Reader, _Wire]:
    """A reader through the handshake, checking what it says at each step."""
    reader = Reader(WHERE, "reader", "p@ss:word", "orders", "nervus test", timeout=1.0)
    wire = _Wire(reader)
    reader.connection_made(wire)
    assert bytes(wire.written) == b"AMQP\x00\x00\x09\x01"
    wire.written.clear()
    reader.data_received(
        _frames((0, commands.Connection.Start(mechanisms="AMQPLAIN PLAIN", locales="en_US")))
    )
    [(channel, start_ok)] = wire.sent()
    assert channel == 0 and isinstance(start_ok, commands.Connection.StartOk)
    assert start_ok.mechanism == "PLAIN"
    assert start_ok.response == "\x00reader\x00p@ss:word"
    assert start_ok.client_properties["connection_name"] == "nervus test"
    assert start_ok.client_properties["capabilities"]["authentication_failure_close"] is True
    reader.data_received(
        _frames(
            (0, commands.Connection.Tune(channel_max=0, frame_max=frame_max, heartbeat=heartbeat))
        )
    )
    [(_, tune_ok), (_, open_)] = wire.sent()
    assert isinstance(tune_ok, commands.Connection.TuneOk)
    assert (tune_ok.frame_max, tune_ok.heartbeat) == (frame_max, heartbeat)
    assert tune_ok.channel_max > 0
    assert isinstance(open_, commands.Connection.Open) and open_.virtual_host == "orders"
    reader.data_received(_frames((0, commands.Connection.OpenOk())))
    await reader.opened()
    assert reader.is_open and reader.frame_max == frame_max
    return reader, wire


Delivered = list[tuple[int, str, dict[str, Any], bytes]]


async def _consume(
    reader: Reader, wire: _Wire, closed: list[TransportError] | None = None
) -> tuple[Consumer, Delivered]:
    """A consumer of queue ``q`` through Channel.Open, Basic.Qos and Basic.Consume."""
    got: Delivered = []
    consumer = reader.consumer()
    task = asyncio.create_task(
        consumer.consume(
            "q",
            prefetch=100_000,
            arguments={"x-stream-offset": 42, "x-note": "first"},
            on_delivery=lambda *delivery: got.append(delivery),
            on_closed=(closed if closed is not None else []).append,
        )
    )
    n = consumer.number
    for expected, reply in (
        (commands.Channel.Open, commands.Channel.OpenOk()),
        (commands.Basic.Qos, commands.Basic.QosOk()),
        (commands.Basic.Consume, commands.Basic.ConsumeOk(consumer_tag=consumer.tag)),
    ):
        await asyncio.sleep(0)
        [(channel, method)] = wire.sent()
        assert channel == n and isinstance(method, expected)
        if isinstance(method, commands.Basic.Qos):
            assert method.prefetch_count == 65535  # the most a Basic.Qos can say
        if isinstance(method, commands.Basic.Consume):
            assert (method.queue, method.no_ack) == ("q", False)
            assert method.arguments == {"x-stream-offset": 42, "x-note": "first"}
        reader.data_received(_frames((n, reply)))
    await task
    return consumer, got


def _message(
    channel: int, tag: int, routing_key: str, headers: dict[str, Any], body: bytes, frame_max: int
) -> bytes:
    """A delivery as the broker sends it, the body cut to fit ``frame_max``."""
    properties = commands.Basic.Properties(
        content_type="application/json",
        content_encoding="identity",
        headers=headers,
        delivery_mode=2,
        message_id=f"m-{tag}",
        timestamp=datetime(2024, 1, 1, tzinfo=UTC),
    )
    step = frame_max - 8
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    return _frames(
        (
            channel,
            commands.Basic.Deliver(
                consumer_tag="nervus-1",
                delivery_tag=tag,
                exchange="nervus.c",
                routing_key=routing_key,
            ),
        ),
        (channel, ContentHeader(0, len(body), properties)),
        *[(channel, ContentBody(chunk)) for chunk in chunks],
    )


BIG = bytes(range(256)) * 50  # 12,800 bytes: four body frames of a 4 KB frame_max


def _stream(channel: int) -> tuple[bytes, Delivered]:
    """Three deliveries (one across body frames, one empty) with a heartbeat between."""
    expected: Delivered = [
        (1, "0.key-a", {"ce_id": "a", "x-stream-offset": 0, "n": 1}, BIG),
        (2, "1", {"ce_id": "b", "x-stream-offset": 1}, b""),
        (3, "0.key-é", {}, b"{}"),
    ]
    data = b"".join(
        [
            _message(channel, *expected[0], frame_max=4096),
            frame.marshal(Heartbeat(), 0),
            _message(channel, *expected[1], frame_max=4096),
            _message(channel, *expected[2], frame_max=4096),
        ]
    )
    return data, expected


async def test_deliveries_arrive_whole_however_the_bytes_are_cut() -> None:
    rng = random.Random(7)
    for cut in ("whole", "bytes", "random"):
        reader, wire = await _open(frame_max=4096)
        consumer, got = await _consume(reader, wire)
        data, expected = _stream(consumer.number)
        if cut == "whole":
            reader.data_received(data)
        elif cut == "bytes":
            for i in range(len(data)):
                reader.data_received(data[i : i + 1])
        else:
            i = 0
            while i < len(data):
                step = rng.randint(1, 5000)
                reader.data_received(data[i : i + step])
                i += step
        assert got == expected, cut
        assert [type(body) for *_, body in got] == [bytes] * 3
        reader.abort()


async def test_acknowledgements_are_written_as_basic_ack() -> None:
    reader, wire = await _open()
    consumer, _ = await _consume(reader, wire)
    consumer.ack(9, multiple=True)
    consumer.ack(10)
    acks = wire.sent()
    assert [(c, type(m), m.delivery_tag, m.multiple) for c, m in acks] == [  # type: ignore[attr-defined]
        (consumer.number, commands.Basic.Ack, 9, True),
        (consumer.number, commands.Basic.Ack, 10, False),
    ]


async def test_a_consumer_cancelled_and_closed_by_the_client() -> None:
    reader, wire = await _open()
    consumer, got = await _consume(reader, wire)
    n = consumer.number
    cancel = asyncio.create_task(consumer.cancel())
    await asyncio.sleep(0)
    [(_, method)] = wire.sent()
    assert isinstance(method, commands.Basic.Cancel) and method.consumer_tag == consumer.tag
    # what the broker sent before confirming is still handed out
    reader.data_received(_message(n, 5, "0.k", {}, b"late", 4096))
    reader.data_received(_frames((n, commands.Basic.CancelOk(consumer_tag=consumer.tag))))
    await cancel
    assert [d[0] for d in got] == [5]
    close = asyncio.create_task(consumer.close())
    await asyncio.sleep(0)
    [(_, method)] = wire.sent()
    assert isinstance(method, commands.Channel.Close) and method.reply_code == 200
    reader.data_received(_frames((n, commands.Channel.CloseOk())))
    await close
    consumer.ack(5)
    assert wire.sent() == []
    assert reader.consumer().number == n  # the number is free again


async def test_a_channel_the_broker_closes_fails_the_call_waiting_on_it() -> None:
    reader, wire = await _open()
    consumer = reader.consumer()
    task = asyncio.create_task(
        consumer.consume("missing", prefetch=10, on_delivery=print, on_closed=print)
    )
    await asyncio.sleep(0)
    wire.sent()
    reader.data_received(
        _frames(
            (
                consumer.number,
                commands.Channel.Close(
                    class_id=60,
                    method_id=20,
                    reply_code=404,
                    reply_text="NOT_FOUND - no queue 'missing' in vhost 'orders'",
                ),
            )
        )
    )
    with pytest.raises(TransportError) as caught:
        await task
    text = str(caught.value)
    assert WHERE in text and "404 NOT_FOUND - no queue 'missing'" in text
    [(_, reply)] = wire.sent()
    assert isinstance(reply, commands.Channel.CloseOk)
    assert reader.is_open  # the connection goes on


async def test_a_consuming_channel_the_broker_closes_or_cancels_is_reported() -> None:
    reader, wire = await _open()
    closed: list[TransportError] = []
    first, got = await _consume(reader, wire, closed)
    second, _ = await _consume(reader, wire, closed)
    reader.data_received(
        _frames(
            (
                first.number,
                commands.Channel.Close(
                    class_id=0, method_id=0, reply_code=406, reply_text="PRECONDITION"
                ),
            )
        )
    )
    assert isinstance(wire.sent()[0][1], commands.Channel.CloseOk)
    reader.data_received(_message(first.number, 1, "0.k", {}, b"x", 4096))  # dropped
    reader.data_received(_frames((second.number, commands.Basic.Cancel(consumer_tag=second.tag))))
    [(channel, close)] = wire.sent()
    assert channel == second.number and isinstance(close, commands.Channel.Close)
    assert got == []
    assert len(closed) == 2
    assert "406 PRECONDITION" in str(closed[0]) and WHERE in str(closed[0])
    assert "cancelled the consumer of channel" in str(closed[1]) and "'q'" in str(closed[1])


async def test_a_refused_login_names_the_broker_and_its_reason() -> None:
    reader = Reader(WHERE, "reader", "secret-password", "orders", "nervus test", timeout=1.0)
    wire = _Wire(reader)
    reader.connection_made(wire)
    reader.data_received(_frames((0, commands.Connection.Start(mechanisms="PLAIN"))))
    reader.data_received(
        _frames(
            (
                0,
                commands.Connection.Close(
                    class_id=0,
                    method_id=0,
                    reply_code=403,
                    reply_text="ACCESS_REFUSED - Login was refused using authentication "
                    "mechanism PLAIN",
                ),
            )
        )
    )
    with pytest.raises(TransportUnavailable) as caught:
        await reader.opened()
    text = str(caught.value)
    assert WHERE in text and "403 ACCESS_REFUSED - Login was refused" in text
    assert "secret-password" not in text
    assert isinstance(wire.sent()[-1][1], commands.Connection.CloseOk)


async def test_a_broker_that_closes_the_connection_is_reported_lost() -> None:
    reader, wire = await _open()
    consumer, _ = await _consume(reader, wire)
    lost: list[TransportError] = []
    reader.on_lost = lambda r, error: lost.append(error)
    reader.data_received(
        _frames(
            (
                0,
                commands.Connection.Close(
                    class_id=0,
                    method_id=0,
                    reply_code=320,
                    reply_text="CONNECTION_FORCED - broker forced shutdown",
                ),
            )
        )
    )
    await asyncio.sleep(0)
    assert [type(f) for _, f in wire.sent()] == [commands.Connection.CloseOk]
    assert wire.closed and not reader.is_open and not consumer.is_open
    [error] = lost
    assert isinstance(error, TransportUnavailable)
    assert WHERE in str(error) and "320 CONNECTION_FORCED" in str(error)


async def test_a_malformed_frame_ends_the_connection_with_a_frame_error() -> None:
    reader, wire = await _open()
    await _consume(reader, wire)
    lost: list[TransportError] = []
    reader.on_lost = lambda r, error: lost.append(error)
    reader.data_received(frame.marshal(Heartbeat(), 0)[:-1] + b"\x00")
    await asyncio.sleep(0)
    [(_, close)] = wire.sent()
    assert isinstance(close, commands.Connection.Close) and close.reply_code == 501
    [error] = lost
    assert WHERE in str(error) and "0xCE" in str(error)


async def test_a_frame_over_frame_max_is_refused() -> None:
    reader, wire = await _open(frame_max=4096)
    consumer, _ = await _consume(reader, wire)
    lost: list[TransportError] = []
    reader.on_lost = lambda r, error: lost.append(error)
    reader.data_received(frame.marshal(ContentBody(b"x" * 5000), consumer.number)[:100])
    await asyncio.sleep(0)
    [error] = lost
    assert "larger than frame_max 4096" in str(error)


async def test_closing_says_so_and_reports_no_loss() -> None:
    reader, wire = await _open()
    lost: list[TransportError] = []
    reader.on_lost = lambda r, error: lost.append(error)
    close = asyncio.create_task(reader.close())
    await asyncio.sleep(0)
    [(_, method)] = wire.sent()
    assert isinstance(method, commands.Connection.Close) and method.reply_code == 200
    reader.data_received(_frames((0, commands.Connection.CloseOk())))
    await close
    assert wire.closed and lost == []


async def test_heartbeats_go_out_and_a_silent_broker_is_given_up() -> None:
    reader, wire = await _open(heartbeat=1)
    lost: list[TransportError] = []
    reader.on_lost = lambda r, error: lost.append(error)
    # the broker stays silent: a heartbeat goes out every half second, and after two
    # seconds without a byte from the broker the connection is given up
    async with asyncio.timeout(10):
        while not lost:
            await asyncio.sleep(0.1)
    sent = wire.sent()
    assert sent and all(isinstance(f, Heartbeat) and c == 0 for c, f in sent)
    assert WHERE in str(lost[0]) and "sent nothing" in str(lost[0])
    assert wire.closed


async def test_a_broker_that_does_not_answer_is_given_up() -> None:
    reader, wire = await _open()
    reader.timeout = 0.05
    lost: list[TransportError] = []
    reader.on_lost = lambda r, error: lost.append(error)
    consumer = reader.consumer()
    with pytest.raises(TransportUnavailable) as caught:
        await consumer.consume("q", prefetch=1, on_delivery=print, on_closed=print)
    assert "Channel.OpenOk" in str(caught.value) and WHERE in str(caught.value)
    await asyncio.sleep(0)
    assert wire.closed and len(lost) == 1


def test_a_stream_message_decodes_as_an_amqp_1_0_client_reads_it() -> None:
    headers: dict[str, str | int] = {
        "ce_id": "évt-1",
        "content-type": "application/json",
        "nervus_published_ms": 1_795_000_000_000,
        "negative": -3,
        "long": "x" * 300,
    }
    body = b"\x00" * 70_000
    message = amqp_decoder(encode(headers, body, "évt-1", "application/json"))
    assert message.body == body
    assert message.properties is not None
    assert message.properties.message_id == "évt-1".encode()
    assert message.properties.content_type == b"application/json"
    assert {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in (message.application_properties or {}).items()
    } == headers


def test_a_stream_message_without_properties_or_headers_is_just_its_body() -> None:
    message = amqp_decoder(encode({}, b"plain"))
    assert message.body == b"plain"
    assert message.properties is None
    assert not message.application_properties
    # a content type AMQP 1.0 cannot carry as a symbol is left to the headers
    message = amqp_decoder(encode({}, b"x", None, "tëxt/plain"))
    assert message.properties is None
