"""Reading transport URLs into typed settings: ``scheme://location?option=value``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msgspec

from nervus.errors import ConfigurationError

if TYPE_CHECKING:
    from nervus.transports._contract import Transport

S = TypeVar("S", bound=msgspec.Struct)

# scheme -> "module:factory"; the factory takes (url, key) and returns a Transport.
# Broker packages are imported only when their scheme is used.
_SCHEMES: dict[str, str] = {
    "memory": "nervus.transports.memory:MemoryTransport.from_url",
    "sqlite": "nervus.transports.sqlite:SqliteTransport.from_url",
    "kafka": "nervus.transports.kafka:KafkaTransport.from_url",
    "nats": "nervus.transports.nats:NatsTransport.from_url",
    "redis": "nervus.transports.redis:RedisTransport.from_url",
    "postgresql": "nervus.transports.postgres:PostgresTransport.from_url",
    "amqp": "nervus.transports.rabbitmq:RabbitTransport.from_url",
}


def register_scheme(scheme: str, factory: str) -> None:
    """Make ``scheme://`` URLs open a transport built by ``"module:Class.from_url"``."""
    _SCHEMES[scheme] = factory


def transport_schemes() -> list[str]:
    return sorted(_SCHEMES)


def from_url(url: str, *, key: str = "NERVUS_TRANSPORT") -> Transport:
    """Build (not connect) the transport a URL names; ``key`` names the setting in errors."""
    scheme = urlsplit(url).scheme
    target = _SCHEMES.get(scheme)
    if target is None:
        accepted = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise ConfigurationError(
            [f"{key}={url!r}: unknown scheme {scheme!r}; accepted: {accepted}"]
        )
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        extra = module_name.rsplit(".", 1)[-1]
        raise ConfigurationError(
            [f"{key}={url!r}: needs an optional dependency ({exc}); pip install 'nervus[{extra}]'"]
        ) from exc
    for part in attr.split("."):
        obj = getattr(obj, part)
    factory: Callable[[str, str], Transport] = obj
    return factory(url, key)


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, fit for errors and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def parse_options(url: str, settings: type[S], *, key: str, **fixed: Any) -> S:
    """Build ``settings`` from a URL's query string (plus ``fixed`` values), reporting
    every unknown option, every bad value and every ``validate()`` problem at once,
    each naming the key. Passwords never appear in the messages."""
    shown = redact(url)
    query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    accepted = [f for f in settings.__struct_fields__ if f not in fixed]
    problems = [
        f"{key}: unknown option {name!r} in {shown!r}; accepted: {', '.join(accepted)}"
        for name in query
        if name not in accepted
    ]
    values: dict[str, Any] = dict(fixed)
    for name, raw in query.items():
        if name not in accepted:
            continue
        try:
            values[name] = msgspec.convert(
                {name: raw}, _single_field(settings, name), strict=False
            )[name]
        except msgspec.ValidationError as exc:
            problems.append(f"{key}: option {name}={raw!r} in {shown!r}: {exc}")
    # the options that were read are still checked together, so one run shows all
    result = msgspec.convert(values, settings, strict=False)
    validate = getattr(result, "validate", None)
    if validate is not None:
        problems += [f"{key}: {p}" for p in validate()]
    if problems:
        raise ConfigurationError(problems)
    return result


def _single_field(settings: type[msgspec.Struct], name: str) -> type[dict[str, Any]]:
    annotation = msgspec.structs.fields(settings)
    for f in annotation:
        if f.name == name:
            return dict[str, f.type]  # type: ignore[name-defined]
    raise KeyError(name)
