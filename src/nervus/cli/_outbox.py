"""``nervus relay`` and ``nervus outbox status``.

``nervus relay`` publishes the store's log and its outbox to the transport
(``NERVUS_STORE``, ``NERVUS_TRANSPORT``) as a process of its own, until SIGTERM or
SIGINT; services then run with ``NERVUS_RELAY=0``. Relays hold a lease in the
store, so running several (for availability) publishes nothing twice: one works,
the others take over when it stops.

``nervus outbox status`` shows what waits in the outbox, what was sent and kept,
and the messages the broker refused, with its reasons.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from nervus.cli._run import (
    EXIT_FAILED,
    EXIT_USAGE,
    _configure_logging,
    _print_problems,
    run_service,
)
from nervus.errors import ConfigurationError, NervusError
from nervus.runtime import Service, Settings
from nervus.storage import OutboxMessage, store_from_url

app = typer.Typer(
    name="outbox",
    help="The transactional outbox: what waits, what was sent, what the broker refused.",
    no_args_is_help=True,
)


def relay_command() -> None:
    """Publish the store's log and outbox to the transport until SIGTERM or SIGINT."""
    try:
        settings = Settings.from_env()
        service = Service("relay", settings=settings, relay=True, outbox=True)
        service.transport  # builds it: a wrong URL fails here  # noqa: B018
        service.store  # noqa: B018
    except ConfigurationError as exc:
        _print_problems(exc)
        raise typer.Exit(EXIT_USAGE) from None
    _configure_logging(settings.logging_level, None)
    raise typer.Exit(run_service(service))


class OutboxStatus(msgspec.Struct, frozen=True):
    store: str
    pending: int
    sent_kept: int
    dead_letters: list[dict[str, object]]


@app.command("status")
def status_command(
    store: Annotated[
        str | None,
        typer.Option("--store", help="The store URL (default: NERVUS_STORE)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Messages waiting in the outbox, sent ones kept, and the broker's refusals."""
    try:
        url = store if store is not None else Settings.from_env().store
        status = asyncio.run(_status(url))
    except ConfigurationError as exc:
        _print_problems(exc)
        raise typer.Exit(EXIT_USAGE) from None
    except NervusError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        typer.echo(json.dumps(msgspec.to_builtins(status)))
        return
    console = Console()
    console.print(
        f"outbox of {status.store}: {status.pending:,} waiting, "
        f"{status.sent_kept:,} sent and kept, {len(status.dead_letters):,} refused"
    )
    if status.dead_letters:
        table = Table(title="refused by the broker (newest first)")
        for column in ("id", "channel", "type", "key", "reason"):
            table.add_column(column)
        for dead in status.dead_letters:
            table.add_row(*(str(dead[c]) for c in ("id", "channel", "type", "key", "reason")))
        console.print(table)


async def _status(url: str) -> OutboxStatus:
    async with store_from_url(url) as store:
        pending, sent = await store.outbox_counts()
        dead = await store.outbox_dead_letters()
        return OutboxStatus(store.url, pending, sent, [_dead(m, reason) for m, reason in dead])


def _dead(message: OutboxMessage, reason: str) -> dict[str, object]:
    return {
        "id": message.id,
        "channel": message.channel,
        "type": message.headers.get("ce_type", "?"),
        "key": message.key,
        "reason": reason,
    }
