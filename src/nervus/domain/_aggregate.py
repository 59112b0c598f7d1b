"""Aggregates: state folded from events, and decisions that turn commands into events.

An aggregate is a mutable msgspec struct: its fields are the state, its ordinary
methods are decisions (they read the state, check the rules, and return the new
events, or raise ``DomainError``), and its ``@evolve`` methods apply one event type
each to the state::

    class Order(Aggregate):
        category = "order"               # streams are "order-<id>"
        status: str = "new"
        total_cents: int = 0

        def place(self, command: PlaceOrder) -> list[Event]:
            if self.status != "new":
                raise DomainError(f"order {command.order_id} is already {self.status}")
            return [OrderPlaced(order_id=command.order_id, total_cents=command.total_cents)]

        @evolve
        def placed(self, event: OrderPlaced) -> None:
            self.status = "placed"
            self.total_cents = event.total_cents

A decision does not change the state itself: the repository applies the events it
returns (through ``@evolve``), so the state is always what the stream says. An
event type without an ``@evolve`` method leaves the state as it is.

``snapshot_version`` names the shape of the state in snapshots: change it when the
fields change, and snapshots of the old shape are ignored (the stream is read from
the start instead).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import msgspec

from nervus.core import Message
from nervus.errors import ConfigurationError

F = TypeVar("F", bound=Callable[..., None])

_EVOLVE = "__nervus_evolves__"


def evolve(fn: F) -> F:
    """Mark a method ``(self, event: SomeEvent) -> None`` as applying ``SomeEvent``."""
    setattr(fn, _EVOLVE, True)
    return fn


class Aggregate(msgspec.Struct, kw_only=True):
    """Base of aggregates: subclass it, declare the state as fields with defaults."""

    category: ClassVar[str] = ""
    """The prefix of the aggregate's stream ids (``<category>-<id>``); default: the
    class name in lower case."""
    snapshot_version: ClassVar[int] = 1
    """The version of the state's shape in snapshots."""

    __evolvers__: ClassVar[dict[type[Message], Callable[[Any, Any], None]] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("category"):
            cls.category = cls.__name__.lower()
        cls.__evolvers__ = None  # found on first use: the event classes may come later

    def apply(self, event: Message) -> None:
        """Apply one event to the state."""
        evolvers = type(self).__evolvers__
        if evolvers is None:
            evolvers = type(self)._find_evolvers()
        fn = evolvers.get(type(event))
        if fn is not None:
            fn(self, event)

    @classmethod
    def _find_evolvers(cls) -> dict[type[Message], Callable[[Any, Any], None]]:
        found: dict[type[Message], Callable[[Any, Any], None]] = {}
        problems: list[str] = []
        for klass in reversed(cls.__mro__):
            for name, fn in vars(klass).items():
                if not getattr(fn, _EVOLVE, False):
                    continue
                event_type = _event_parameter(cls, name, fn, problems)
                if event_type is None:
                    continue
                known = found.get(event_type)
                if known is not None and known.__name__ != name:
                    problems.append(
                        f"{cls.__qualname__}: {known.__name__} and {name} both evolve "
                        f"{event_type.__qualname__}"
                    )
                found[event_type] = fn
        if problems:
            raise ConfigurationError(problems)
        cls.__evolvers__ = found
        return found

    @classmethod
    def stream_id(cls, aggregate_id: str) -> str:
        """The stream of the aggregate ``aggregate_id``."""
        return f"{cls.category}-{aggregate_id}"


def _event_parameter(
    cls: type[Aggregate], name: str, fn: Callable[..., None], problems: list[str]
) -> type[Message] | None:
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        problems.append(f"{cls.__qualname__}.{name}: cannot read its annotations ({exc})")
        return None
    params = [p for p in hints if p != "return"]
    event_type = hints[params[0]] if len(params) == 1 else None
    if not (isinstance(event_type, type) and issubclass(event_type, Message)):
        problems.append(
            f"{cls.__qualname__}.{name}: an @evolve method takes one annotated event, "
            f"e.g. def {name}(self, event: OrderPlaced) -> None"
        )
        return None
    return event_type
