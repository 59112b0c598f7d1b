"""The two services of the money-transfer test, each run with ``nervus run``.

    TRANSFERS_RUN=xfer-1a2b nervus run tests.slow.transfers_child:transfers
    TRANSFERS_RUN=xfer-1a2b nervus run tests.slow.transfers_child:accounts

``transfers`` handles ``TransferRequested`` (inbox on): in one transaction it
debits the source account in its ``balances`` table, writes the debit to
``debits`` and publishes ``Debited`` through the outbox. ``accounts`` handles
``Debited`` (inbox on): in one transaction it credits the target account in its
``credits`` table and writes the credit to ``ledger``. Neither table has a key
that would refuse a second debit or credit of one transfer: only the inboxes
keep them from happening twice.

``TRANSFERS_RUN`` names this run's channels and consumer groups, so runs on a
shared broker never read each other's messages. The tables are created by the
test before the services start.
"""

from __future__ import annotations

import os

from nervus import Context, Event, Service

RUN = os.environ.get("TRANSFERS_RUN", "transfers-test")


class TransferRequested(
    Event,
    type="transferstest.money.transfer-requested.v1",
    channel=f"{RUN}.requests",
    key="source",
):
    transfer_id: str
    source: str
    target: str
    cents: int


class Debited(Event, type="transferstest.money.debited.v1", channel=f"{RUN}.debited", key="target"):
    transfer_id: str
    source: str
    target: str
    cents: int


transfers = Service("transfers", outbox=True)
accounts = Service("accounts")


@transfers.on(TransferRequested, group=f"{RUN}-transfers", inbox=True)
async def debit(event: TransferRequested, ctx: Context) -> None:
    async with ctx.transaction() as tx:
        changed = await tx.execute(
            f"UPDATE {tx.namespace}balances SET cents = cents - ? WHERE account = ?",
            event.cents,
            event.source,
        )
        if changed != 1:
            raise LookupError(f"no account {event.source!r}")
        await tx.execute(
            f"INSERT INTO {tx.namespace}debits (transfer_id, account, cents) VALUES (?, ?, ?)",
            event.transfer_id,
            event.source,
            event.cents,
        )
        await tx.publish(
            Debited(
                transfer_id=event.transfer_id,
                source=event.source,
                target=event.target,
                cents=event.cents,
            )
        )


@accounts.on(Debited, group=f"{RUN}-accounts", inbox=True)
async def credit(event: Debited, ctx: Context) -> None:
    async with ctx.transaction() as tx:
        changed = await tx.execute(
            f"UPDATE {tx.namespace}credits SET cents = cents + ? WHERE account = ?",
            event.cents,
            event.target,
        )
        if changed != 1:
            raise LookupError(f"no account {event.target!r}")
        await tx.execute(
            f"INSERT INTO {tx.namespace}ledger (transfer_id, account, cents) VALUES (?, ?, ?)",
            event.transfer_id,
            event.target,
            event.cents,
        )
