"""Typed events and commands, declared as classes with a stable type name.

    class OrderPlaced(Event, type="shop.order.placed.v1", key="order_id"):
        order_id: str
        amount_cents: int

``type`` is the CloudEvents ``type`` and never changes once published; a new
shape gets a new name (``...v2``). ``channel`` is where the event travels; it
defaults to the type name without its last two parts (``shop.order``), so every
event of one entity shares a channel and keeps per-key order. ``key`` names the
field whose value is the partition key (all events of one key stay in order).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, dataclass_transform

import msgspec

from nervus.errors import ConfigurationError, UnknownEventType

_TYPE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9_-]+)+$")
_CHANNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")


@dataclass_transform(kw_only_default=True, frozen_default=True)
class _MessageMeta(msgspec.StructMeta):
    """Takes nervus's class keywords (type, channel, key) before msgspec sees the rest."""

    def __new__(
        mcls,
        name: str,
        bases: tuple[type, ...],
        namespace: dict[str, Any],
        type: str | None = None,
        channel: str | None = None,
        key: str | None = None,
        **struct_options: Any,
    ) -> Any:
        cls: Any = super().__new__(mcls, name, bases, namespace, **struct_options)
        if type is None:
            if channel is not None or key is not None:
                raise ConfigurationError([f"{name}: channel= and key= need type= as well"])
            return cls
        problems = []
        if not _TYPE_NAME.match(type):
            problems.append(
                f"{name}: type={type!r} must be dotted lower-case words, "
                "e.g. 'shop.order.placed.v1'"
            )
        chan = channel if channel is not None else _default_channel(type)
        if not _CHANNEL_NAME.match(chan):
            problems.append(f"{name}: channel={chan!r} must be letters, digits, '.', '_' or '-'")
        if key is not None and key not in cls.__struct_fields__:
            problems.append(
                f"{name}: key={key!r} is not a field; fields are {list(cls.__struct_fields__)}"
            )
        if problems:
            raise ConfigurationError(problems)
        cls.__message_type__ = type
        cls.__message_channel__ = chan
        cls.__message_key__ = key
        REGISTRY.register(cls)
        return cls


def _default_channel(type_name: str) -> str:
    parts = type_name.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else parts[0]


class Message(msgspec.Struct, metaclass=_MessageMeta, kw_only=True, frozen=True):
    """Base of events and commands: a frozen, typed msgspec struct with a type name."""

    __message_type__: ClassVar[str]
    __message_channel__: ClassVar[str]
    __message_key__: ClassVar[str | None]

    def partition_key(self) -> str | None:
        """The value of the declared key field, as text, or None when no key is declared."""
        field = self.__message_key__
        if field is None:
            return None
        value = getattr(self, field)
        return None if value is None else str(value)


class Event(Message):
    """Something that happened. Past tense, immutable, published to many."""


class Command(Message):
    """A request to do something, addressed to one handler."""


def type_name(cls: type[Message]) -> str:
    """The stable type name of an event or command class."""
    try:
        return cls.__message_type__
    except AttributeError:
        raise ConfigurationError(
            [
                f"{cls.__qualname__}: declare a type name, "
                f"e.g. class {cls.__name__}(Event, type='app.thing.done.v1')"
            ]
        ) from None


def channel_of(cls: type[Message]) -> str:
    """The channel an event or command class travels on."""
    type_name(cls)
    return cls.__message_channel__


def channel_of_type(name: str, registry: TypeRegistry | None = None) -> str:
    """The channel events of the type ``name`` travel on: their class's, or for a type
    no class declares (a stored event of removed code), the default for its name."""
    cls = (registry or REGISTRY).get(name)
    return cls.__message_channel__ if cls is not None else _default_channel(name)


class TypeRegistry:
    """Maps type names to classes. One per process; every declared class registers itself."""

    def __init__(self) -> None:
        self._by_name: dict[str, type[Message]] = {}
        self.generation = 0
        """Counts registrations: a cache of lookups is valid while it is unchanged."""

    def register(self, cls: type[Message]) -> None:
        self.generation += 1
        name = cls.__message_type__
        known = self._by_name.get(name)
        if known is not None and known is not cls:
            same_place = (known.__module__, known.__qualname__) == (
                cls.__module__,
                cls.__qualname__,
            )
            if not same_place:
                raise ConfigurationError(
                    [
                        f"type {name!r} is declared twice: {known.__module__}.{known.__qualname__} "
                        f"and {cls.__module__}.{cls.__qualname__}; give each a distinct name"
                    ]
                )
        self._by_name[name] = cls

    def resolve(self, name: str) -> type[Message]:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownEventType(name, list(self._by_name)) from None

    def get(self, name: str) -> type[Message] | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)


REGISTRY = TypeRegistry()
