"""The summary table printed at the end of a shop run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from examples.shop._audit import Audit, Books
from nervus.domain import ProjectionStatus


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def render(
    audit: Audit,
    books: Books,
    exit_codes: Mapping[str, int],
    elapsed: float,
    finished: bool,
    history: ProjectionStatus | None,
    duplicates: tuple[int, int],
) -> bool:
    """Print the summary; True when every order settled, the books balance and every
    service stopped cleanly."""
    console = Console()
    outcomes = Counter(audit.outcome.values())
    table = Table(title="nervus shop", show_header=True, header_style="bold")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("orders placed", f"{audit.total:,}")
    table.add_row("orders completed", f"{outcomes['completed']:,}")
    table.add_row("orders cancelled", f"{outcomes['cancelled']:,}")
    table.add_row("  out of stock", f"{outcomes['cancelled'] - len(audit.released):,}")
    table.add_row("  payment failed, stock released", f"{len(audit.released):,}")
    table.add_row("customers notified", f"{len(audit.notified):,}")
    table.add_row("end-to-end latency p50", f"{percentile(audit.latencies, 0.50) * 1000:.1f} ms")
    table.add_row("end-to-end latency p99", f"{percentile(audit.latencies, 0.99) * 1000:.1f} ms")
    table.add_row("stock reserved", f"{books.reserved:,}")
    table.add_row("stock released + shipped", f"{books.released:,} + {books.shipped:,}")
    dead = ", ".join(f"{k}: {v}" for k, v in sorted(audit.dead_letters.items())) or "0"
    table.add_row("messages dead-lettered", dead)
    table.add_row(
        "redelivered messages suppressed by the inbox",
        f"{duplicates[1]:,} ({duplicates[0]:,} reservations delivered twice)",
    )
    if history is not None:
        table.add_row(
            "order-history read model",
            f"position {history.position:,} of {history.head:,}, lag {history.lag:,}",
        )
    table.add_row("elapsed", f"{elapsed:.1f} s")
    console.print(table)

    channels = Table(title="events per channel", header_style="bold")
    channels.add_column("channel")
    channels.add_column("events", justify="right")
    for channel, count in sorted(audit.per_channel.items()):
        channels.add_row(channel, f"{count:,}")
    console.print(channels)

    problems = list(books.problems)
    if history is None:
        problems.append("the order-history projection never ran")
    if not finished:
        problems.append(
            f"only {audit.finished:,} of {audit.total:,} orders settled "
            f"({len(audit.notified):,} notified) before the timeout"
        )
    problems += [f"service {n} exited with {c}" for n, c in exit_codes.items() if c != 0]
    for problem in problems:
        console.print(f"[red]✗ {problem}")
    if not problems:
        console.print("[green]✓ every order settled, every customer notified, the books balance")
    return not problems
