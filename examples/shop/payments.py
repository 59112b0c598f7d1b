"""Payments: captures the amount of each reserved order; some fail on purpose.

Each payment is a row in payments' own table, written in the same transaction as
the event it publishes (through the outbox) and as the inbox record of the
reservation it answers: a reservation delivered twice is charged once.
"""

from __future__ import annotations

import os
import zlib

from examples.shop.events import PaymentCaptured, PaymentFailed, StockReserved
from nervus import Context, Service

service = Service("payments")

FAIL_RATE_VARIABLE = "SHOP_PAYMENT_FAIL_RATE"


def _declined(order_id: str) -> bool:
    """A stable, pseudo-random decision: the same order is always declined or always not."""
    rate = float(os.environ.get(FAIL_RATE_VARIABLE, "0.1"))
    return (zlib.crc32(order_id.encode()) % 10_000) < rate * 10_000


_tables_ready = False


async def _create_tables() -> None:
    global _tables_ready
    if _tables_ready:
        return
    async with service.transaction() as tx:
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {tx.namespace}payments "
            "(order_id TEXT PRIMARY KEY, status TEXT NOT NULL, amount_cents INTEGER NOT NULL)"
        )
    _tables_ready = True


@service.on(StockReserved, inbox=True)
async def capture(event: StockReserved, ctx: Context) -> None:
    await _create_tables()
    declined = _declined(event.order_id)
    async with ctx.transaction() as tx:
        await tx.execute(
            f"INSERT INTO {tx.namespace}payments VALUES (?, ?, ?)",
            event.order_id,
            "declined" if declined else "captured",
            event.amount_cents,
        )
        if declined:
            await tx.publish(PaymentFailed(order_id=event.order_id, reason="card declined"))
        else:
            await tx.publish(
                PaymentCaptured(
                    order_id=event.order_id,
                    sku=event.sku,
                    quantity=event.quantity,
                    amount_cents=event.amount_cents,
                )
            )
