"""The service of the outbox crash test, killed with SIGKILL at random points.

    OUTBOX_CRASH_POINTS="before-commit=0.02,after-commit=0.02,publish=0.1" \\
        python tests/slow/outbox_crash_child.py STORE_URL TRANSPORT_URL KILLS_FILE

Service ``ledger`` handles ``Deposit`` with ``inbox=True``: in one
``ctx.transaction()`` it adds the amount to the account's row, writes the
attempt's random nonce to ``applied`` and publishes ``Deposited`` carrying that
nonce through the outbox. An outbox relay publishes the outbox from the same
process (with a short lease, so a restarted process takes over within a second).

``OUTBOX_CRASH_POINTS`` names where the process kills itself, each with a
probability: ``before-commit`` (inside the transaction, after its writes and its
publish), ``after-commit`` (right after the commit, before the delivery is
acknowledged and before the relay can publish) and ``publish`` (inside the relay's
publish: after sending none, some or all of the batch, before the outbox marks it
sent). Before dying the process appends ``<point> <nonce>`` to ``KILLS_FILE``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import uuid

from nervus import Context, Event, Service, Settings
from nervus.runtime._outbox import OutboxRelay, Publish
from nervus.storage import store_from_url
from nervus.transports import OutgoingMessage, Transport, from_url

POINTS_VARIABLE = "OUTBOX_CRASH_POINTS"
REQUESTS = "outboxcrash.requests"
DEPOSITED = "outboxcrash.deposited"


class Deposit(
    Event, type="outboxcrash.account.deposit-requested.v1", channel=REQUESTS, key="account"
):
    request: str
    account: str
    cents: int


class Deposited(Event, type="outboxcrash.account.deposited.v1", channel=DEPOSITED, key="account"):
    request: str
    account: str
    cents: int
    nonce: str


class Crashes:
    """Where this process kills itself, and with what probability."""

    def __init__(self, spec: str, kills_file: str) -> None:
        self.chances = {}
        for part in filter(None, spec.split(",")):
            point, _, chance = part.partition("=")
            self.chances[point.strip()] = float(chance)
        self._fd = os.open(kills_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def maybe(self, point: str, nonce: str = "-") -> None:
        if random.random() < self.chances.get(point, 0.0):
            self.die(point, nonce)

    def due(self, point: str) -> bool:
        return random.random() < self.chances.get(point, 0.0)

    def die(self, point: str, nonce: str = "-") -> None:
        os.write(self._fd, f"{point} {nonce}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def ledger(store_url: str, transport_url: str, crashes: Crashes) -> Service:
    settings = Settings(
        transport=transport_url,
        store=store_url,
        relay=False,  # the relay below runs in this process, with a short lease
        max_in_flight=20,
        max_attempts=1000,  # deliveries cut short by a kill are no handler failures
        backoff_initial=0.05,
        backoff_max=0.5,
        shutdown_timeout=5,
    )
    service = Service("ledger", settings=settings, outbox=True)

    @service.on(Deposit, inbox=True)
    async def deposit(event: Deposit, ctx: Context) -> None:
        nonce = uuid.uuid4().hex
        async with ctx.transaction() as tx:
            changed = await tx.execute(
                f"UPDATE {tx.namespace}accounts SET cents = cents + ? WHERE account = ?",
                event.cents,
                event.account,
            )
            assert changed == 1, event.account
            await tx.execute(
                f"INSERT INTO {tx.namespace}applied (request, nonce) VALUES (?, ?)",
                event.request,
                nonce,
            )
            await tx.publish(
                Deposited(
                    request=event.request, account=event.account, cents=event.cents, nonce=nonce
                )
            )
            crashes.maybe("before-commit", nonce)
        crashes.maybe("after-commit", nonce)

    return service


def crashing_publish(transport: Transport, crashes: Crashes) -> Publish:
    async def publish(channel: str, messages: list[OutgoingMessage]) -> None:
        if crashes.due("publish"):
            cut = random.randint(0, len(messages))  # none, some or all of the batch
            if cut:
                await transport.publish(channel, messages[:cut])
            crashes.die("publish", f"{cut}/{len(messages)}")
        await transport.publish(channel, messages)

    return publish


async def main(store_url: str, transport_url: str, kills_file: str) -> None:
    crashes = Crashes(os.environ.get(POINTS_VARIABLE, ""), kills_file)
    service = ledger(store_url, transport_url, crashes)
    async with store_from_url(store_url) as store, from_url(transport_url) as transport:
        relay = OutboxRelay(
            store, crashing_publish(transport, crashes), batch=20, lease_seconds=1.0
        )
        relaying = asyncio.create_task(relay.run())
        try:
            await service.run()  # until SIGTERM
        finally:
            relaying.cancel()
            await asyncio.gather(relaying, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
