"""JSON payloads with msgspec: one encoder, one cached decoder per event class."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from nervus.errors import DecodeError

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


class JsonCodec:
    """Converts typed values to JSON bytes and back. ``content_type`` is ``application/json``."""

    content_type = "application/json"

    def encode(self, value: object) -> bytes:
        return _encoder.encode(value)

    def decode(self, data: bytes, cls: type[T], *, type_name: str | None = None) -> T:
        decoder = _decoders.get(cls)
        if decoder is None:
            decoder = _decoders[cls] = msgspec.json.Decoder(cls)
        try:
            return decoder.decode(data)  # type: ignore[no-any-return]
        except msgspec.DecodeError as exc:
            raise DecodeError(type_name or cls.__qualname__, str(exc)) from exc


JSON_CODEC = JsonCodec()
