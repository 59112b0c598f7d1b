"""Stored events back into typed events, upcast when they are old."""

from __future__ import annotations

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

    def decode(self, recorded: RecordedEvent) -> Message:
        if recorded.datacontenttype != _JSON:
            raise DecodeError(
                recorded.type,
                f"content type {recorded.datacontenttype!r} is not {_JSON!r}",
                stream_id=recorded.stream_id,
                version=recorded.version,
            )
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
