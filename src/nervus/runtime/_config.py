"""The runtime's settings: a typed object with defaults, read from ``NERVUS_*`` variables.

``Settings()`` holds the defaults; ``Settings.from_env(os.environ)`` reads the
environment; ``validate()`` lists every problem at once, each naming the setting
and what it accepts. The transport URL is checked by building (not connecting)
the transport it names, which reports an unknown scheme, an unknown option or a
missing optional dependency; the store URL is checked for its shape only.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec

from nervus.errors import ConfigurationError
from nervus.transports import from_url, transport_schemes

DEFAULT_URL = "sqlite:///.nervus/nervus.db"
STORE_SCHEMES = ("postgresql", "sqlite")
LOG_LEVELS = ("CRITICAL", "DEBUG", "ERROR", "INFO", "WARNING")

# Variables that share the prefix but are read by the test suite, not by the runtime.
_FOREIGN_EXACT = frozenset({"NERVUS_REQUIRE_SERVICES"})
_FOREIGN_PREFIXES = ("NERVUS_TEST_",)


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """How a service connects and consumes. Every field has a working default."""

    transport: str = DEFAULT_URL
    """URL of the broker or embedded log (``NERVUS_TRANSPORT``)."""
    store: str = DEFAULT_URL
    """URL of the database for stores (``NERVUS_STORE``): ``sqlite:///`` or ``postgresql://``."""
    max_in_flight: int = 1000
    """Deliveries fetched but not yet settled, per consumer group (``NERVUS_MAX_IN_FLIGHT``)."""
    immediate_retries: int = 2
    """Re-invocations in process after a handler fails, before a delayed redelivery."""
    max_attempts: int = 5
    """Deliveries of one message before it is dead-lettered (``NERVUS_MAX_ATTEMPTS``)."""
    backoff_initial: float = 1.0
    """Delay in seconds before the second delivery (``NERVUS_BACKOFF_INITIAL``)."""
    backoff_max: float = 60.0
    """Longest delay in seconds between deliveries (``NERVUS_BACKOFF_MAX``)."""
    backoff_multiplier: float = 2.0
    """Growth of the delay per delivery (``NERVUS_BACKOFF_MULTIPLIER``)."""
    backoff_jitter: float = 0.2
    """Fraction of the delay taken off at random, 0 to 1 (``NERVUS_BACKOFF_JITTER``)."""
    shutdown_timeout: float = 30.0
    """Seconds to finish in-flight work when stopping (``NERVUS_SHUTDOWN_TIMEOUT``)."""
    publish_timeout: float = 30.0
    """Seconds a publish keeps retrying while the broker is unreachable, with backoff,
    before it raises (``NERVUS_PUBLISH_TIMEOUT``); 0 raises at once."""
    relay: bool = True
    """Run the relays (the store's log and the outbox to the transport) inside each
    service that needs them (``NERVUS_RELAY``); ``0`` when ``nervus relay`` runs them
    as a process of their own."""
    relay_lease: float = 10.0
    """Seconds a relay's lease lasts without renewal (``NERVUS_RELAY_LEASE``): how long
    publishing may stop when the relay holding it dies before another takes over."""
    inbox_retention: float = 7 * 86400.0
    """Seconds a handled message's id stays in the inbox (``NERVUS_INBOX_RETENTION``):
    a redelivery later than that runs its handler again."""
    outbox_retention: float = 3600.0
    """Seconds a published outbox message is kept before it is purged
    (``NERVUS_OUTBOX_RETENTION``)."""
    log_level: str = "INFO"
    """Level of nervus's log output (``NERVUS_LOG_LEVEL``)."""

    def validate(self) -> list[str]:
        """Every problem, each as ``key: what is wrong and what is accepted``."""
        problems: list[str] = []
        problems += _check_transport_url(self.transport)
        problems += _check_store_url(self.store)
        problems += _at_least(self, "max_in_flight", 1)
        problems += _at_least(self, "immediate_retries", 0)
        problems += _at_least(self, "max_attempts", 1)
        problems += _positive(self, "backoff_initial")
        problems += _positive(self, "backoff_max")
        problems += _at_least(self, "backoff_multiplier", 1.0)
        problems += _at_least(self, "shutdown_timeout", 0.0)
        problems += _at_least(self, "publish_timeout", 0.0)
        problems += _positive(self, "inbox_retention")
        problems += _positive(self, "relay_lease")
        problems += _at_least(self, "outbox_retention", 0.0)
        if not (
            _finite(self.backoff_jitter) and 0.0 <= self.backoff_jitter <= 1.0
        ):  # also catches NaN
            problems.append(
                f"{_name('backoff_jitter')}={self.backoff_jitter!r}: "
                "must be a number from 0 to 1 (the fraction of a delay taken off at random)"
            )
        if (
            _finite(self.backoff_initial)
            and _finite(self.backoff_max)
            and self.backoff_max < self.backoff_initial
        ):
            problems.append(
                f"{_name('backoff_max')}={self.backoff_max!r}: must be at least "
                f"{_name('backoff_initial')}={self.backoff_initial!r}"
            )
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(
                f"{_name('log_level')}={self.log_level!r}: accepted: {', '.join(LOG_LEVELS)}"
            )
        return problems

    def checked(self) -> Settings:
        """These settings, or ``ConfigurationError`` listing every problem."""
        problems = self.validate()
        if problems:
            raise ConfigurationError(problems)
        return self

    @property
    def logging_level(self) -> int:
        """``log_level`` as a ``logging`` level number."""
        level: int = logging.getLevelName(self.log_level.upper())
        return level

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``NERVUS_*`` variables (``os.environ`` by default).

        Raises ``ConfigurationError`` listing every problem at once: unreadable
        values, values out of range, and unknown ``NERVUS_*`` names (with the
        closest known name).
        """
        env = os.environ if environ is None else environ
        problems: list[str] = []
        values: dict[str, Any] = {}
        known = {_env_name(f): f for f in cls.__struct_fields__}
        for name, raw in env.items():
            if not name.startswith("NERVUS_"):
                continue
            field = known.get(name)
            if field is None:
                if name not in _FOREIGN_EXACT and not name.startswith(_FOREIGN_PREFIXES):
                    problems.append(_unknown(name, list(known)))
                continue
            try:
                values[field] = _convert(field, raw)
            except ValueError as exc:
                problems.append(f"{name}={raw!r}: {exc}")
        if problems:
            # Report the values that could be read as well, so one run lists everything.
            problems += cls(**values).validate()
            raise ConfigurationError(problems)
        return cls(**values).checked()


def _env_name(field: str) -> str:
    return "NERVUS_" + field.upper()


def _name(field: str) -> str:
    return f"{field} ({_env_name(field)})"


_FIELD_TYPES: dict[str, type] = {f.name: f.type for f in msgspec.structs.fields(Settings)}


def _convert(field: str, raw: str) -> Any:
    kind = _FIELD_TYPES[field]
    text = raw.strip()
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected a whole number") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected a number of seconds or a ratio, e.g. 1.5") from None
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    return text


def _unknown(name: str, known: list[str]) -> str:
    # Compare without the shared prefix, which would make every name look close.
    suffixes = {k.removeprefix("NERVUS_"): k for k in known}
    close = difflib.get_close_matches(name.removeprefix("NERVUS_"), suffixes, n=1, cutoff=0.6)
    hint = (
        f"; did you mean {suffixes[close[0]]}?" if close else f"; known: {', '.join(sorted(known))}"
    )
    return f"{name}: unknown nervus setting{hint}"


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _at_least(settings: Settings, field: str, minimum: float) -> list[str]:
    value = getattr(settings, field)
    whole = _FIELD_TYPES[field] is int
    if _finite(value) and value >= minimum and (isinstance(value, int) or not whole):
        return []
    what = "a whole number" if whole else "a number"
    return [f"{_name(field)}={value!r}: must be {what} >= {minimum}"]


def _positive(settings: Settings, field: str) -> list[str]:
    value = getattr(settings, field)
    if _finite(value) and value > 0:
        return []
    return [f"{_name(field)}={value!r}: must be a number of seconds > 0"]


def _check_transport_url(url: str) -> list[str]:
    schemes = transport_schemes()
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme in schemes:
        try:
            from_url(url, key=_name("transport"))  # builds without connecting: checks options
        except ConfigurationError as exc:
            return exc.problems
        return []
    accepted = ", ".join(f"{s}://" for s in schemes)
    return [f"{_name('transport')}={url!r}: unknown scheme {scheme!r}; accepted: {accepted}"]


def _check_store_url(url: str) -> list[str]:
    accepted = "sqlite:///path/to/file.db or postgresql://user@host:5432/dbname"
    if "://" not in url:
        return [f"{_name('store')}={url!r}: not a URL; accepted: {accepted}"]
    parts = urlsplit(url)
    if parts.scheme not in STORE_SCHEMES:
        return [f"{_name('store')}={url!r}: unknown scheme {parts.scheme!r}; accepted: {accepted}"]
    if parts.scheme == "sqlite" and (parts.netloc or not parts.path.strip("/")):
        return [
            f"{_name('store')}={url!r}: a sqlite URL names a file: sqlite:///relative.db "
            "or sqlite:////absolute/path.db"
        ]
    if parts.scheme == "postgresql" and not (parts.netloc or parts.path.strip("/")):
        return [f"{_name('store')}={url!r}: names no server or database; accepted: {accepted}"]
    return []
