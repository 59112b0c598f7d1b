"""The ``nervus`` command: one typer app, one module per command."""

from __future__ import annotations

import typer

from nervus.cli._outbox import app as outbox_app
from nervus.cli._outbox import relay_command
from nervus.cli._projections import app as projections_app
from nervus.cli._run import run_command

app = typer.Typer(
    name="nervus",
    help="Typed event-driven microservices on a durable log.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Typed event-driven microservices on a durable log."""


app.command("run")(run_command)
app.command("relay")(relay_command)
app.add_typer(projections_app)
app.add_typer(outbox_app)


def main() -> None:
    """Entry point of the ``nervus`` console script."""
    app()


__all__ = ["app", "main"]
