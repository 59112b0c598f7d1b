"""Settings: defaults, reading NERVUS_* variables, and reporting every problem at once."""

from __future__ import annotations

import logging

import pytest

from nervus.errors import ConfigurationError
from nervus.runtime import RetryPolicy, Settings

pytestmark = pytest.mark.unit


def test_defaults_are_valid_and_embedded() -> None:
    settings = Settings()
    assert settings.validate() == []
    assert settings.transport == "sqlite:///.nervus/nervus.db"
    assert settings.store == settings.transport
    assert settings.logging_level == logging.INFO


def test_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_reads_every_variable() -> None:
    env = {
        "NERVUS_TRANSPORT": "memory://shop?partitions=2",
        "NERVUS_STORE": "postgresql://app@db:5432/shop",
        "NERVUS_MAX_IN_FLIGHT": "64",
        "NERVUS_IMMEDIATE_RETRIES": "0",
        "NERVUS_MAX_ATTEMPTS": "3",
        "NERVUS_BACKOFF_INITIAL": "0.5",
        "NERVUS_BACKOFF_MAX": "10",
        "NERVUS_BACKOFF_MULTIPLIER": "3",
        "NERVUS_BACKOFF_JITTER": "0",
        "NERVUS_SHUTDOWN_TIMEOUT": "5",
        "NERVUS_LOG_LEVEL": "debug",
        "HOME": "/root",
    }
    settings = Settings.from_env(env)
    assert settings == Settings(
        transport="memory://shop?partitions=2",
        store="postgresql://app@db:5432/shop",
        max_in_flight=64,
        immediate_retries=0,
        max_attempts=3,
        backoff_initial=0.5,
        backoff_max=10.0,
        backoff_multiplier=3.0,
        backoff_jitter=0.0,
        shutdown_timeout=5.0,
        log_level="debug",
    )
    assert settings.logging_level == logging.DEBUG


def test_a_misspelt_name_gets_the_closest_known_one() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"NERVUS_TRANSPROT": "memory://x", "NERVUS_SHUTDOWN_TIMEOUTS": "1"})
    assert info.value.problems == [
        "NERVUS_TRANSPROT: unknown nervus setting; did you mean NERVUS_TRANSPORT?",
        "NERVUS_SHUTDOWN_TIMEOUTS: unknown nervus setting; did you mean NERVUS_SHUTDOWN_TIMEOUT?",
    ]


def test_every_problem_is_reported_at_once() -> None:
    env = {
        "NERVUS_TRANSPORT": "kafak://localhost:9092",
        "NERVUS_STORE": "mysql://db/shop",
        "NERVUS_MAX_IN_FLIGHT": "many",
        "NERVUS_MAX_ATTEMPTS": "0",
        "NERVUS_BACKOFF_JITTER": "1.5",
        "NERVUS_LOG_LEVEL": "LOUD",
        "NERVUS_MAX_INFLIGHT": "10",
    }
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    problems = info.value.problems
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "transport (NERVUS_TRANSPORT)='kafak://localhost:9092': unknown scheme" in text
    assert "memory://" in text
    assert "sqlite://" in text
    assert "store (NERVUS_STORE)='mysql://db/shop'" in text
    assert "postgresql://" in text
    assert "NERVUS_MAX_IN_FLIGHT='many': expected a whole number" in text
    assert "NERVUS_MAX_ATTEMPTS" in text
    assert ">= 1" in text
    assert "NERVUS_BACKOFF_JITTER" in text
    assert "from 0 to 1" in text
    assert "NERVUS_LOG_LEVEL" in text
    assert "DEBUG" in text
    assert "NERVUS_MAX_INFLIGHT: unknown nervus setting; did you mean NERVUS_MAX_IN_FLIGHT?" in text
    # the message of the error lists them all too
    for problem in problems:
        assert problem in str(info.value)


def test_unknown_variable_without_a_close_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"NERVUS_ZZZ": "1"})
    (problem,) = info.value.problems
    assert problem.startswith("NERVUS_ZZZ: unknown nervus setting; known: ")
    assert "NERVUS_TRANSPORT" in problem


def test_variables_of_the_test_suite_are_not_settings() -> None:
    env = {"NERVUS_REQUIRE_SERVICES": "1", "NERVUS_TEST_KAFKA": "x", "NERVUS_TEST_PG_URL": "y"}
    assert Settings.from_env(env) == Settings()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("max_in_flight", 0, "max_in_flight (NERVUS_MAX_IN_FLIGHT)=0: must be a whole number >= 1"),
        ("max_in_flight", 2.5, "must be a whole number >= 1"),
        ("immediate_retries", -1, "immediate_retries (NERVUS_IMMEDIATE_RETRIES)=-1"),
        ("backoff_initial", 0.0, "backoff_initial (NERVUS_BACKOFF_INITIAL)=0.0: must be"),
        ("backoff_multiplier", 0.5, "must be a number >= 1.0"),
        ("shutdown_timeout", -1.0, "shutdown_timeout (NERVUS_SHUTDOWN_TIMEOUT)=-1.0"),
        ("backoff_jitter", float("nan"), "backoff_jitter"),
        ("store", "sqlite://", "a sqlite URL names a file"),
        ("store", "postgresql://", "names no server or database"),
        ("store", "shop.db", "not a URL"),
        ("transport", "localhost:9092", "unknown scheme"),
    ],
)
def test_validate_names_the_key_and_what_is_accepted(
    field: str, value: object, expected: str
) -> None:
    settings = Settings(**{field: value})  # type: ignore[arg-type]
    problems = settings.validate()
    assert len(problems) == 1, problems
    assert expected in problems[0]
    with pytest.raises(ConfigurationError):
        settings.checked()


def test_backoff_max_below_initial_is_a_problem() -> None:
    problems = Settings(backoff_initial=5.0, backoff_max=1.0).validate()
    assert problems == [
        "backoff_max (NERVUS_BACKOFF_MAX)=1.0: must be at least "
        "backoff_initial (NERVUS_BACKOFF_INITIAL)=5.0"
    ]


def test_non_finite_numbers_are_refused_when_read() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"NERVUS_SHUTDOWN_TIMEOUT": "inf"})
    assert info.value.problems == ["NERVUS_SHUTDOWN_TIMEOUT='inf': expected a finite number"]


def test_retry_policy_follows_settings() -> None:
    settings = Settings(
        immediate_retries=1,
        max_attempts=4,
        backoff_initial=0.5,
        backoff_max=3.0,
        backoff_multiplier=2.0,
        backoff_jitter=0.5,
    )
    policy = RetryPolicy.from_settings(settings)
    assert policy == RetryPolicy(
        immediate_retries=1, max_attempts=4, initial=0.5, multiplier=2.0, max=3.0, jitter=0.5
    )
