"""Upcasting: old stored payloads read as the current event classes.

An event type never changes shape; a new shape is a new type name
(``shop.order.placed.v2``). Events stored under the old name stay as they were
written. An upcaster turns an old payload (as a plain JSON value) into the
payload of the next type name; upcasters chain (v1 -> v2 -> v3) until a name
with a registered class is reached, and the result is checked against that
class like any payload::

    @upcaster("shop.order.placed.v1", to="shop.order.placed.v2")
    def add_currency(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "currency": "EUR"}

A type with a registered class is decoded directly, without upcasting (the fast
path); a type that has neither a class nor an upcaster is unknown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from nervus.core import REGISTRY, Message, TypeRegistry
from nervus.errors import ConfigurationError, DecodeError, UnknownEventType

Upcast = Callable[[Any], Any]
"""Takes an old payload (decoded JSON: dicts, lists, strings, numbers) and returns
the payload of the next type."""


class Upcasters:
    """The upcasters of a process, keyed by the type name they read."""

    def __init__(self) -> None:
        self._by_source: dict[str, tuple[str, Upcast]] = {}
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

    def register(self, source: str, target: str, fn: Upcast) -> None:
        """Read payloads stored as ``source`` as ``target`` through ``fn``."""
        problems = []
        known = self._by_source.get(source)
        if known is not None and known != (target, fn):
            problems.append(
                f"two upcasters read {source!r}: to {known[0]!r} ({_name(known[1])}) and to "
                f"{target!r} ({_name(fn)}); a stored type has one next version"
            )
        if source in self.chain(target):  # the registered upcasters never loop
            problems.append(
                f"upcaster {_name(fn)} from {source!r} to {target!r} closes a loop: "
                f"{' -> '.join([source, *self.chain(target)])}"
            )
        if problems:
            raise ConfigurationError(problems)
        self._by_source[source] = (target, fn)

    def chain(self, type_name: str) -> list[str]:
        """The type names a payload stored as ``type_name`` goes through, itself first."""
        names = [type_name]
        while names[-1] in self._by_source:
            names.append(self._by_source[names[-1]][0])
        return names

    def decode(self, type_name: str, data: bytes, registry: TypeRegistry = REGISTRY) -> Message:
        """The typed event ``data`` stored as ``type_name`` reads as today.

        Raises ``UnknownEventType`` when no class and no upcaster know the type (or
        the upcasters end at a type without a class), ``DecodeError`` when the
        payload does not fit (the error names the type it was read as).
        """
        cls = registry.get(type_name)
        if cls is not None:
            return self._decode_typed(type_name, data, cls)
        if type_name not in self._by_source:
            raise UnknownEventType(type_name, registry.names())
        try:
            payload = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            raise DecodeError(type_name, f"not JSON: {exc}") from exc
        current = type_name
        while cls is None:
            step = self._by_source.get(current)
            if step is None:
                raise UnknownEventType(current, registry.names())
            target, fn = step
            try:
                payload = fn(payload)
            except Exception as exc:
                raise DecodeError(
                    current, f"upcaster {_name(fn)} to {target!r} failed: {exc!r}"
                ) from exc
            current = target
            cls = registry.get(current)
        try:
            return msgspec.convert(payload, cls)
        except msgspec.ValidationError as exc:
            raise DecodeError(current, f"upcast from {type_name!r}: {exc}") from exc

    def json_decoder(self, cls: type[Message]) -> msgspec.json.Decoder[Any]:
        """The JSON decoder of ``cls``, made once."""
        decoder = self._decoders.get(cls)
        if decoder is None:
            decoder = self._decoders[cls] = msgspec.json.Decoder(cls)
        return decoder

    def _decode_typed(self, type_name: str, data: bytes, cls: type[Message]) -> Message:
        decoder = self.json_decoder(cls)
        try:
            event: Message = decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise DecodeError(type_name, str(exc)) from exc
        return event


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


UPCASTERS = Upcasters()
"""The process's upcasters; ``@upcaster`` registers here."""


def upcaster(source: str, *, to: str, into: Upcasters = UPCASTERS) -> Callable[[Upcast], Upcast]:
    """Register the decorated function as the upcaster from ``source`` to ``to``."""

    def register(fn: Upcast) -> Upcast:
        into.register(source, to, fn)
        return fn

    return register
