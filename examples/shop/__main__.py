"""Run the shop: start its services, place orders, watch them settle, check the books.

    python -m examples.shop [--orders 10000] [--in-process]

Each service runs in its own process (``nervus run examples.shop.<name>:service``)
on the transport that ``NERVUS_TRANSPORT`` names (by default an embedded SQLite
log under ``.nervus/shop``). Orders keeps its aggregates and its order-history read
model in the event store ``NERVUS_STORE`` names (by default a SQLite file there
too). Exits 0 only when every order reached a final state, every customer was
notified, the stock books balance and the read model agrees with the events.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from examples.shop._audit import Audit
from examples.shop._report import render
from examples.shop._state import STATE_DIR_VARIABLE
from examples.shop.events import PlaceOrder
from examples.shop.payments import FAIL_RATE_VARIABLE
from nervus import Service
from nervus.domain import ProjectionStatus, projection_statuses
from nervus.storage import store_from_url

SERVICE_NAMES = ("orders", "inventory", "payments", "shipping", "notifications")
SKUS = ["sku-book", "sku-lamp", "sku-mug", "sku-limited"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.shop", description=__doc__)
    parser.add_argument("--orders", type=int, default=10_000, help="orders to place")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="orders placed per second (0: all at once)"
    )
    parser.add_argument("--fail-rate", type=float, default=0.1, help="share of payments declined")
    parser.add_argument("--poison", type=int, default=2, help="undecodable messages to inject")
    parser.add_argument(
        "--duplicates", type=int, default=20, help="reservations to deliver a second time"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many s")
    parser.add_argument("--state", default=".nervus/shop", help="folder for the log and tables")
    parser.add_argument(
        "--in-process", action="store_true", help="run every service in this process"
    )
    return parser.parse_args(argv)


def make_orders(count: int, rng: random.Random) -> list[PlaceOrder]:
    result = []
    for n in range(count):
        quantity = rng.randint(1, 3)
        result.append(
            PlaceOrder(
                order_id=f"order-{n:06d}",
                customer_id=f"customer-{rng.randint(1, 500):03d}",
                sku=rng.choice(SKUS),
                quantity=quantity,
                amount_cents=quantity * rng.choice([1299, 2450, 899]),
            )
        )
    return result


class Processes:
    """The services, each in a process of its own, started with ``nervus run``."""

    def __init__(self, env: dict[str, str], log_dir: Path, stores: dict[str, str]) -> None:
        self._env = env
        self._log_dir = log_dir
        self._stores = stores
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for name in SERVICE_NAMES:
            log = open(self._log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            self._procs[name] = subprocess.Popen(
                [sys.executable, "-m", "nervus", "run", f"examples.shop.{name}:service"],
                env={**self._env, "NERVUS_STORE": self._stores[name]},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_started(self, timeout: float = 60.0) -> None:
        """Wait until every service says it has started consuming (its first log line)."""
        deadline = time.monotonic() + timeout
        waiting = set(self._procs)
        while waiting and time.monotonic() < deadline:
            for name in list(waiting):
                text = (self._log_dir / f"{name}.log").read_text(errors="replace")
                if f"service '{name}' started" in text:
                    waiting.discard(name)
            if self.crashed():
                return
            await asyncio.sleep(0.05)

    def suppressed(self) -> int:
        """Redelivered messages the services' inboxes suppressed (from their logs)."""
        total = 0
        for name in self._procs:
            text = (self._log_dir / f"{name}.log").read_text(errors="replace")
            total += sum(int(n) for n in re.findall(r"the inbox suppressed (\d+)", text))
        return total

    def crashed(self) -> list[str]:
        return [n for n, p in self._procs.items() if p.poll() is not None]

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        deadline = time.monotonic() + timeout
        for name, proc in self._procs.items():
            try:
                codes[name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


def prepare(args: argparse.Namespace) -> Path:
    """A fresh state folder, and the environment every service process inherits."""
    state = Path(args.state)
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    os.environ.setdefault("NERVUS_TRANSPORT", f"sqlite:///{state}/log.db")
    # each service keeps its own database (on PostgreSQL, when NERVUS_STORE says so,
    # they share one database, each with its own tables)
    os.environ.setdefault("NERVUS_STORE", _default_store(state, "store"))
    os.environ[STATE_DIR_VARIABLE] = str(state)
    os.environ[FAIL_RATE_VARIABLE] = str(args.fail_rate)
    return state


def _default_store(state: Path, name: str) -> str:
    # synchronous=normal: a commit survives the process being killed (what the demo
    # shows) without waiting for an fsync; synchronous=full (nervus's default) also
    # survives a power loss, at one fsync per handler transaction.
    return f"sqlite:///{state}/{name}.db?synchronous=normal"


def stores(state: Path, in_process: bool) -> dict[str, str]:
    """The store of each service: a SQLite file each by default (one shared file when
    they run in one process), or the one ``NERVUS_STORE`` names."""
    shared = os.environ["NERVUS_STORE"]
    if in_process or shared != _default_store(state, "store"):
        return {name: shared for name in SERVICE_NAMES}
    return {name: _default_store(state, f"{name}-store") for name in SERVICE_NAMES}


async def main(args: argparse.Namespace, state: Path) -> int:
    services = {
        name: importlib.import_module(f"examples.shop.{name}").service for name in SERVICE_NAMES
    }
    placed = make_orders(args.orders, random.Random(7))
    storefront = Service("storefront")
    audit = Audit(total=len(placed), consumers=services)
    processes: Processes | None = None
    started = time.perf_counter()
    async with storefront:
        await audit.start(storefront.transport)
        store_of = stores(state, args.in_process)
        if args.in_process:
            for svc in services.values():
                await svc.start()
        else:
            processes = Processes(dict(os.environ), state, store_of)
            processes.start()
            await processes.wait_started()
        try:
            publishing = asyncio.create_task(_place(storefront, placed, audit, args.rate))
            await audit.inject_poison(storefront.transport, args.poison)
            duplicating = asyncio.create_task(
                audit.inject_duplicates(
                    storefront.transport, args.duplicates, within=args.timeout / 2
                )
            )
            finished = await audit.watch(
                timeout=args.timeout,
                crashed=processes.crashed if processes else lambda: [],
                expected_dead_letters=audit.expected_dead_letters(args.poison),
            )
            await publishing
            injected = await duplicating
            if finished:
                await _read_model_caught_up(store_of["orders"], timeout=30.0)
        finally:
            exit_codes = processes.stop() if processes else await _stop_in_process(services)
            await audit.close()
    elapsed = time.perf_counter() - started
    statuses, history = await _read_model(store_of["orders"])
    stock, charged = await _tables(store_of["inventory"], store_of["payments"])
    books = audit.books(stock_available=stock, order_statuses=statuses)
    if charged != len(audit.reserved):
        books.problems.append(
            f"payments holds {charged} payments for {len(audit.reserved)} reservations"
        )
    suppressed = (
        processes.suppressed()
        if processes
        else sum(svc.inbox.duplicates for svc in services.values())
    )
    ok = render(audit, books, exit_codes, elapsed, finished, history, (injected, suppressed))
    return 0 if ok else 1


async def _tables(inventory: str, payments: str) -> tuple[dict[str, int] | None, int]:
    """Inventory's stock per SKU (None before it created its tables), and how many
    payments the payments table holds."""
    async with store_from_url(inventory) as store:
        try:
            async with store.transaction() as tx:
                rows = await tx.fetch(f"SELECT sku, available FROM {tx.namespace}stock")
            stock: dict[str, int] | None = {str(s): int(str(a)) for s, a in rows}
        except Exception:
            stock = None
    async with store_from_url(payments) as store:
        try:
            async with store.transaction() as tx:
                (count,) = await tx.fetch(f"SELECT count(*) FROM {tx.namespace}payments")
            charged = int(str(count[0]))
        except Exception:
            charged = 0
    return stock, charged


async def _read_model_caught_up(url: str, timeout: float) -> None:
    """Wait (bounded) until the order-history projection has applied the whole log."""
    deadline = time.monotonic() + timeout
    async with store_from_url(url) as store:
        while time.monotonic() < deadline:
            found = [s for s in await projection_statuses(store) if s.name == "order-history"]
            if found and found[0].lag == 0:
                return
            await asyncio.sleep(0.1)


async def _read_model(url: str) -> tuple[dict[str, int], ProjectionStatus | None]:
    """Orders per status in the order-history read model, and the projection's status."""
    async with store_from_url(url) as store:
        found = [s for s in await projection_statuses(store) if s.name == "order-history"]
        if not found:
            return {}, None
        async with store.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT status, count(*) FROM {store.namespace}order_history GROUP BY status"
            )
        return {str(status): int(str(count)) for status, count in rows}, found[0]


async def _place(storefront: Service, placed: list[PlaceOrder], audit: Audit, rate: float) -> None:
    """Place the orders at ``rate`` per second, in small batches (all at once for 0)."""
    batch_size = 500 if rate <= 0 else max(1, int(rate / 20))
    began = time.perf_counter()
    for start in range(0, len(placed), batch_size):
        if rate > 0:
            due = began + start / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
        batch = placed[start : start + batch_size]
        audit.placed_at(batch, time.perf_counter())
        await storefront.publish_many(batch)


async def _stop_in_process(services: dict[str, Service]) -> dict[str, int]:
    for svc in services.values():
        await svc.stop()
    return {name: 0 for name in services}


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(asyncio.run(main(arguments, prepare(arguments))))
