"""``nervus projections status`` and ``nervus projections rebuild NAME``.

``status`` reads the projections' checkpoints from the store (``--store`` or
``NERVUS_STORE``): it needs no application code. ``rebuild`` needs the projection's
code: it loads the service that declares it (``--service module:attr``), replays the
whole log into a new generation of its tables and swaps it in while readers and the
running service carry on.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from nervus.cli._run import EXIT_FAILED, EXIT_USAGE, TargetError, _print_problems, load_service
from nervus.domain import ProjectionRunner, ProjectionStatus, projection_statuses
from nervus.errors import ConfigurationError, NervusError
from nervus.runtime import Settings
from nervus.storage import store_from_url

app = typer.Typer(
    name="projections",
    help="Read models built from the event store: their positions, lag and rebuilds.",
    no_args_is_help=True,
)

StoreOption = Annotated[
    str | None,
    typer.Option("--store", help="The store URL (default: NERVUS_STORE, or the embedded file)."),
]


def _store_url(store: str | None) -> str:
    return store if store is not None else Settings.from_env().store


@app.command("status")
def status_command(
    store: StoreOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Each projection's live generation, position, the store's head and the lag."""
    try:
        url = _store_url(store)
        statuses = asyncio.run(_statuses(url))
    except ConfigurationError as exc:
        _print_problems(exc)
        raise typer.Exit(EXIT_USAGE) from None
    except NervusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        typer.echo(json.dumps([msgspec.to_builtins(s) for s in statuses]))
        return
    table = Table(title=f"projections in {store_from_url(url).url}")
    for column in ("projection", "generation", "position", "head", "lag"):
        table.add_column(column, justify="left" if column == "projection" else "right")
    for s in statuses:
        table.add_row(s.name, str(s.generation), str(s.position), str(s.head), str(s.lag))
    Console().print(table if statuses else "no projection has run on this store yet")


async def _statuses(url: str) -> list[ProjectionStatus]:
    async with store_from_url(url) as opened:
        return await projection_statuses(opened)


@app.command("rebuild")
def rebuild_command(
    name: Annotated[str, typer.Argument(help="The projection's name.", show_default=False)],
    service: Annotated[
        str,
        typer.Option(
            "--service",
            help="The service declaring it: 'package.module:attribute'.",
            show_default=False,
        ),
    ],
) -> None:
    """Replay the whole log into fresh tables and swap them in without downtime."""
    try:
        target = load_service(service)
        projection = next((p for p in target.projections if p.name == name), None)
        if projection is None:
            known = ", ".join(p.name for p in target.projections) or "none"
            raise TargetError(f"{service!r} declares no projection {name!r}; it declares: {known}")
        runner = ProjectionRunner(store_from_url(target.settings.store), projection)
    except (ConfigurationError, TargetError) as exc:
        _print_problems(exc)
        raise typer.Exit(EXIT_USAGE) from None

    async def rebuild() -> tuple[int, ProjectionStatus]:
        async with runner.store:
            generation = await runner.rebuild()
            return generation, await runner.status()

    try:
        generation, status = asyncio.run(rebuild())
    except NervusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    typer.echo(
        f"projection {name!r} rebuilt: generation {generation} is live at position "
        f"{status.position} (head {status.head})"
    )
