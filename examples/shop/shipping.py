"""Shipping: dispatches every paid order."""

from __future__ import annotations

import hashlib

from examples.shop.events import PaymentCaptured, ShipmentDispatched
from nervus import Context, Service

service = Service("shipping")


@service.on(PaymentCaptured)
async def dispatch(event: PaymentCaptured, ctx: Context) -> None:
    tracking = "TRK-" + hashlib.blake2s(event.order_id.encode(), digest_size=6).hexdigest().upper()
    await ctx.publish(
        ShipmentDispatched(
            order_id=event.order_id, sku=event.sku, quantity=event.quantity, tracking_code=tracking
        )
    )
