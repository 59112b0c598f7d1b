"""Reading URLs into typed settings (``scheme://location?option=value``), and the
registries that map a URL's scheme to what it opens (a transport, a store)."""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msgspec

from nervus.errors import ConfigurationError

S = TypeVar("S", bound=msgspec.Struct)
T = TypeVar("T")


class SchemeRegistry(Generic[T]):
    """Maps URL schemes to ``"module:Class.from_url"`` factories taking ``(url, key)``.

    A factory's module is imported only when its scheme is used, so an optional
    dependency is needed only by those who name it; a missing one is reported with
    the ``pip install 'nervus[extra]'`` that brings it.
    """

    def __init__(self, what: str, schemes: dict[str, str]) -> None:
        self._what = what
        self._schemes = dict(schemes)

    def register(self, scheme: str, factory: str) -> None:
        self._schemes[scheme] = factory

    def schemes(self) -> list[str]:
        return sorted(self._schemes)

    def build(self, url: str, key: str) -> T:
        """Build (not connect) what ``url`` names; ``key`` names the setting in errors."""
        scheme = urlsplit(url).scheme
        target = self._schemes.get(scheme)
        if target is None:
            accepted = ", ".join(f"{s}://" for s in sorted(self._schemes))
            raise ConfigurationError(
                [
                    f"{key}={redact(url)!r}: unknown scheme {scheme!r} for a {self._what}; "
                    f"accepted: {accepted}"
                ]
            )
        module_name, _, attr = target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            extra = module_name.rsplit(".", 1)[-1]
            raise ConfigurationError(
                [
                    f"{key}={redact(url)!r}: needs an optional dependency ({exc}); "
                    f"pip install 'nervus[{extra}]'"
                ]
            ) from exc
        for part in attr.split("."):
            obj = getattr(obj, part)
        built: T = obj(url, key)
        return built


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
