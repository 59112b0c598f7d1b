"""Codecs: typed values <-> bytes, and upcasters that read old payloads as new types."""

from nervus.codecs._json import JSON_CODEC, JsonCodec
from nervus.codecs._upcast import UPCASTERS, Upcast, Upcasters, upcaster

__all__ = ["JSON_CODEC", "UPCASTERS", "JsonCodec", "Upcast", "Upcasters", "upcaster"]
