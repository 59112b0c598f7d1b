"""Codecs: typed values <-> bytes."""

from nervus.codecs._json import JSON_CODEC, JsonCodec

__all__ = ["JSON_CODEC", "JsonCodec"]
