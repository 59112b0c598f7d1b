"""Stored events back into typed events, upcast when they are old."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from nervus.codecs import UPCASTERS, Upcasters
from nervus.core import REGISTRY, Message, TypeRegistry
from nervus.errors import DecodeError, UnknownEventType
from nervus.storage import RecordedEvent

_JSON = "application/json"


class EventDecoder:
    """Decodes recorded events with a type registry and upcasters; errors name the
    stream, the version and the type."""

    def __init__(self, registry: TypeRegistry = REGISTRY, upcasters: Upcasters = UPCASTERS) -> None:
        self.registry = registry
        self.upcasters = upcasters
        # type name -> its class's JSON decoder, for types a class declares (those
        # are never upcast); valid while the registry is unchanged
        self._direct: dict[str, Callable[[bytes], Message]] = {}
        self._generation = registry.generation

    def decode(self, recorded: RecordedEvent) -> Message:
        direct = self._direct.get(recorded.type)
        if (
            direct is not None
            and recorded.datacontenttype == _JSON
            and self._generation == self.registry.generation
        ):
            try:
                return direct(recorded.data)
            except msgspec.DecodeError:
                pass  # the full path below names what is wrong
        return self._decode(recorded)

    def _decode(self, recorded: RecordedEvent) -> Message:
        if self._generation != self.registry.generation:
            self._direct.clear()
            self._generation = self.registry.generation
        if recorded.datacontenttype != _JSON:
            raise DecodeError(
                recorded.type,
                f"content type {recorded.datacontenttype!r} is not {_JSON!r}",
                stream_id=recorded.stream_id,
                version=recorded.version,
            )
        cls = self.registry.get(recorded.type)
        if cls is not None:
            self._direct[recorded.type] = self.upcasters.json_decoder(cls).decode
        try:
            return self.upcasters.decode(recorded.type, recorded.data, self.registry)
        except UnknownEventType as exc:
            raise UnknownEventType(
                exc.event_type,
                exc.known,
                stream_id=recorded.stream_id,
                version=recorded.version,
            ) from exc
        except DecodeError as exc:
            raise DecodeError(
                exc.event_type,
                exc.reason,
                stream_id=recorded.stream_id,
                version=recorded.version,
            ) from exc
