"""``nervus projections status`` and ``nervus projections rebuild``."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nervus.cli import app
from nervus.cli._run import load_service

pytestmark = pytest.mark.unit

MODULE = """
from nervus import Command, Event, Service, Settings
from nervus.domain import Aggregate, Projection, ReadModelTransaction, evolve, handles


class Tally(Command, type="cli.{tag}.tally.v1", key="counter"):
    counter: str


class Tallied(Event, type="cli.{tag}.tallied.v1", key="counter"):
    counter: str


class Counter(Aggregate):
    count: int = 0

    @evolve
    def _tallied(self, event: Tallied) -> None:
        self.count += 1


class Counts(Projection):
    name = "counts"
    tables = {{"counts": "CREATE TABLE {{counts}} (counter TEXT PRIMARY KEY, n INTEGER)"}}

    @handles
    async def tallied(self, event: Tallied, tx: ReadModelTransaction) -> None:
        if not await tx.execute("UPDATE {{counts}} SET n = n + 1 WHERE counter = ?", event.counter):
            await tx.execute("INSERT INTO {{counts}} VALUES (?, 1)", event.counter)


service = Service(
    "counter",
    settings=Settings(transport="memory://{tag}", store="sqlite:///{store}"),
)
service.projection(Counts())


@service.command(Tally, aggregate=Counter)
def tally(counter: Counter, command: Tally) -> list[Event]:
    return [Tallied(counter=command.counter)]
"""


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    tag = f"m{uuid.uuid4().hex[:10]}"
    store = f"{tmp_path}/cli.db"
    (tmp_path / f"{tag}.py").write_text(textwrap.dedent(MODULE.format(tag=tag, store=store)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tag, f"sqlite:///{store}"
    sys.modules.pop(tag, None)


def run_service_briefly(target: str, tallies: int) -> None:
    service = load_service(target)
    module = sys.modules[target.partition(":")[0]]

    async def main() -> None:
        async with service:
            for n in range(tallies):
                await service.execute(module.Tally(counter=f"c{n % 3}"))
            (runner,) = service._sourcing.projections
            async with asyncio.timeout(10):
                while (await runner.status()).lag:
                    await asyncio.sleep(0.02)

    asyncio.run(main())


def test_status_and_rebuild(app_module: tuple[str, str]) -> None:
    tag, store = app_module
    cli = CliRunner()
    empty = cli.invoke(app, ["projections", "status", "--store", store])
    assert empty.exit_code == 0, empty.output
    assert "no projection has run" in empty.output
    run_service_briefly(f"{tag}:service", 7)
    shown = cli.invoke(app, ["projections", "status", "--store", store, "--json"])
    assert shown.exit_code == 0, shown.output
    (status,) = json.loads(shown.output)
    assert (status["name"], status["generation"], status["lag"]) == ("counts", 1, 0)
    assert status["position"] == status["head"] == 7
    table = cli.invoke(app, ["projections", "status", "--store", store])
    assert "counts" in table.output
    rebuilt = cli.invoke(app, ["projections", "rebuild", "counts", "--service", f"{tag}:service"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "generation 2 is live at position 7" in rebuilt.output
    (status,) = json.loads(
        cli.invoke(app, ["projections", "status", "--store", store, "--json"]).output
    )
    assert (status["generation"], status["position"]) == (2, 7)


def test_rebuild_of_an_unknown_projection_names_the_known_ones(
    app_module: tuple[str, str],
) -> None:
    tag, _ = app_module
    result = CliRunner().invoke(
        app, ["projections", "rebuild", "nope", "--service", f"{tag}:service"]
    )
    assert result.exit_code == 2
    assert "declares no projection 'nope'; it declares: counts" in result.output


def test_status_with_a_bad_store_url() -> None:
    result = CliRunner().invoke(app, ["projections", "status", "--store", "mysql://x/y"])
    assert result.exit_code == 2
    assert "unknown scheme 'mysql'" in result.output
