"""Handler registrations: which function handles which event type in which group."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from nervus.core import Message

if TYPE_CHECKING:
    from nervus.runtime._context import Context

E = TypeVar("E", bound=Message)

Handler = Callable[[E, "Context"], Awaitable[None]]
"""An async function taking the typed event and its ``Context``."""


@dataclass(frozen=True, slots=True)
class Registration:
    """One handler for one event type in one consumer group."""

    group: str
    event_type: type[Message]
    type_name: str
    channel: str
    fn: Callable[[Any, Context], Awaitable[None]]
    name: str
    logger: logging.Logger = field(compare=False)
    inbox: bool = False
    """Redeliveries of a message this group handled are acknowledged, not handled."""


def describe(fn: Callable[..., object]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}.{qualname}"
