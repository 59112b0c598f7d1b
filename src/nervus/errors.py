"""The one error tree of nervus.

Every error says whether a retry can help (``retryable``) and carries the context
a user needs to act on it::

    NervusError
    ├── ConfigurationError        a setting is wrong; lists every problem at once
    ├── SerializationError        bytes <-> event failed
    │   ├── DecodeError           a payload does not match its type
    │   └── UnknownEventType      no class is registered for a type name
    ├── TransportError            the broker or the embedded log failed
    │   ├── TransportUnavailable  cannot reach the broker (retryable)
    │   └── TransportClosed       the transport or subscription was closed
    ├── StoreError                the event store failed
    │   ├── StoreUnavailable      cannot reach the database (retryable)
    │   ├── ConcurrencyError      a stream moved on since it was read (retryable)
    │   └── EventIdConflict       an event id is already stored at another place
    ├── DomainError               a command was refused by the domain's rules
    └── HandlerError              raised by a handler (wraps the cause) in reports

Ack, nack and dead-letter are calls on a subscription, never exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence


class NervusError(Exception):
    """Base of every error nervus raises."""

    retryable: bool = False


class ConfigurationError(NervusError):
    """One or more settings are wrong. ``problems`` lists each as ``key: what and how to fix``."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid nervus configuration:\n{lines}")


class SerializationError(NervusError):
    """Converting between bytes and a typed event failed."""


class DecodeError(SerializationError):
    """A payload could not be decoded into its declared type.

    Read from an event store, it names the stream and the version too.
    """

    def __init__(
        self,
        event_type: str,
        reason: str,
        *,
        stream_id: str | None = None,
        version: int | None = None,
    ) -> None:
        self.event_type = event_type
        self.reason = reason
        self.stream_id = stream_id
        self.version = version
        super().__init__(
            f"cannot decode event of type {event_type!r}{_at(stream_id, version)}: {reason}"
        )


class UnknownEventType(SerializationError):
    """No event class (and no upcaster) is registered for a type name.

    Read from an event store, it names the stream and the version too.
    """

    def __init__(
        self,
        event_type: str,
        known: Sequence[str] = (),
        *,
        stream_id: str | None = None,
        version: int | None = None,
    ) -> None:
        self.event_type = event_type
        self.known = list(known)
        self.stream_id = stream_id
        self.version = version
        hint = f"; registered types: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"unknown event type {event_type!r}{_at(stream_id, version)}{hint}")


def _at(stream_id: str | None, version: int | None) -> str:
    if stream_id is None:
        return ""
    return f" at stream {stream_id!r} version {version}"


class TransportError(NervusError):
    """The broker or the embedded log failed an operation."""

    def __init__(self, message: str, *, channel: str | None = None) -> None:
        self.channel = channel
        where = f" (channel {channel!r})" if channel else ""
        super().__init__(f"{message}{where}")


class TransportUnavailable(TransportError):
    """The broker cannot be reached; a retry later can succeed."""

    retryable = True


class TransportClosed(TransportError):
    """The transport or the subscription has been closed."""


class HandlerError(NervusError):
    """A handler failed; ``__cause__`` is the original exception."""

    retryable = True

    def __init__(self, handler: str, event_type: str, cause: BaseException) -> None:
        self.handler = handler
        self.event_type = event_type
        super().__init__(f"handler {handler!r} failed on {event_type!r}: {cause!r}")


class StoreError(NervusError):
    """The event store failed an operation."""

    def __init__(self, message: str, *, stream_id: str | None = None) -> None:
        self.stream_id = stream_id
        where = f" (stream {stream_id!r})" if stream_id is not None else ""
        super().__init__(f"{message}{where}")


class StoreUnavailable(StoreError):
    """The store's database cannot be reached or is locked; a retry later can succeed."""

    retryable = True


class ConcurrencyError(StoreError):
    """An append expected a stream version the stream no longer has.

    Someone appended to the stream since it was read: load it again, decide again
    and append with the new version (a repository does this by itself).
    """

    retryable = True

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"expected stream version {expected}, but the stream is at version {actual}",
            stream_id=stream_id,
        )


class EventIdConflict(StoreError):
    """An appended event's id is already stored, at another stream or version.

    Appending the same events again at the same place is a no-op; an id reused for
    a different event is a bug in the caller.
    """

    def __init__(self, stream_id: str, event_id: str, stored_at: str) -> None:
        self.event_id = event_id
        self.stored_at = stored_at
        super().__init__(
            f"event id {event_id!r} is already stored at {stored_at}", stream_id=stream_id
        )


class DomainError(NervusError):
    """A command was refused by the domain's rules ("the order is already shipped").

    Raise it (or a subclass) from a decision; the command fails with it and nothing
    is appended. A retry cannot help: the same command meets the same rules.
    """
