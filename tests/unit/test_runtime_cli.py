"""``nervus run``: finding the Service and refusing bad targets and settings (exit 2)."""

from __future__ import annotations

import os
import textwrap
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nervus.cli import app
from nervus.cli._run import TargetError, load_service
from nervus.runtime import Service

pytestmark = pytest.mark.unit


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A working directory holding a module with two Services and a non-Service."""
    name = f"svcmod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from nervus import Service, Settings

            orders = Service("orders", settings=Settings(transport="memory://cli"))
            billing = Service("billing", settings=Settings(transport="memory://cli"))
            not_a_service = 42
            """
        )
    )
    (tmp_path / f"{name}_single.py").write_text(
        "from nervus import Service, Settings\n"
        "only = Service('only', settings=Settings(transport='memory://cli'))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for key in [k for k in os.environ if k.startswith("NERVUS_")]:
        monkeypatch.delenv(key)
    return tmp_path, name


def test_load_service_by_attribute_or_the_only_one(project: tuple[Path, str]) -> None:
    _, name = project
    orders = load_service(f"{name}:orders")
    assert isinstance(orders, Service)
    assert orders.name == "orders"
    assert load_service(f"{name}_single").name == "only"


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        (":missing", "has no attribute 'missing'; Services there: billing, orders"),
        (":not_a_service", "is a int, not a nervus Service"),
        ("", "the module holds 2 Services (billing, orders)"),
        (":", "expected 'module:attribute'"),
    ],
)
def test_bad_targets_are_explained(project: tuple[Path, str], suffix: str, message: str) -> None:
    _, name = project
    with pytest.raises(TargetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_service(name + suffix)


def test_a_missing_module_is_a_target_error(project: tuple[Path, str]) -> None:
    with pytest.raises(TargetError, match="no module named 'no_such_module_here'"):
        load_service("no_such_module_here:svc")


def test_run_exits_2_on_a_bad_target(project: tuple[Path, str]) -> None:
    _, name = project
    result = CliRunner().invoke(app, ["run", f"{name}:missing"])
    assert result.exit_code == 2
    assert "has no attribute 'missing'" in result.output


def test_run_exits_2_when_memory_is_asked_for_several_workers(project: tuple[Path, str]) -> None:
    _, name = project
    result = CliRunner().invoke(app, ["run", f"{name}:orders", "--workers", "3"])
    assert result.exit_code == 2
    assert (
        "--workers 3: the transport (memory://cli) cannot share a consumer group" in result.output
    )


def test_run_exits_2_listing_every_settings_problem(
    project: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, name = project
    (tmp / f"{name}_env.py").write_text("from nervus import Service\nsvc = Service('from-env')\n")
    monkeypatch.setenv("NERVUS_TRANSPORT", "carrierpigeon://loft")
    monkeypatch.setenv("NERVUS_BACKOFF_JITTER", "2")
    result = CliRunner().invoke(app, ["run", f"{name}_env:svc"])
    assert result.exit_code == 2
    assert "invalid configuration" in result.output
    assert "unknown scheme 'carrierpigeon'" in result.output
    assert "NERVUS_BACKOFF_JITTER" in result.output


def test_help_lists_the_run_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "run" in result.output
