"""Payments: captures the amount of each reserved order; some fail on purpose."""

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


@service.on(StockReserved)
async def capture(event: StockReserved, ctx: Context) -> None:
    if _declined(event.order_id):
        await ctx.publish(PaymentFailed(order_id=event.order_id, reason="card declined"))
        return
    await ctx.publish(
        PaymentCaptured(
            order_id=event.order_id,
            sku=event.sku,
            quantity=event.quantity,
            amount_cents=event.amount_cents,
        )
    )
