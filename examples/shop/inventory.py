"""Inventory: reserves stock for new orders and releases it when payment fails.

Stock and reservations are ordinary tables in inventory's store. Each handler
changes them in the same transaction as the events it publishes (through the
outbox) and the inbox record of the message it handles, so a message delivered
twice changes the stock once and is answered once.
"""

from __future__ import annotations

from examples.shop.events import (
    OrderPlaced,
    PaymentFailed,
    StockRejected,
    StockReleased,
    StockReserved,
)
from nervus import Context, Service

service = Service("inventory")

# SKU -> units in stock at the start. "sku-limited" runs out, so some orders are rejected.
INITIAL_STOCK = {
    "sku-book": 1_000_000,
    "sku-lamp": 1_000_000,
    "sku-mug": 1_000_000,
    "sku-limited": 3000,
}

_tables_ready = False


async def create_tables() -> None:
    """Create and stock the tables once per process (idempotent)."""
    global _tables_ready
    if _tables_ready:
        return
    async with service.transaction() as tx:
        ns = tx.namespace
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {ns}stock "
            "(sku TEXT PRIMARY KEY, available INTEGER NOT NULL)"
        )
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {ns}reservations (order_id TEXT PRIMARY KEY, "
            "sku TEXT NOT NULL, quantity INTEGER NOT NULL, status TEXT NOT NULL)"
        )
        for sku, units in INITIAL_STOCK.items():
            await tx.execute(
                f"INSERT INTO {ns}stock VALUES (?, ?) ON CONFLICT (sku) DO NOTHING", sku, units
            )
    _tables_ready = True


@service.on(OrderPlaced, inbox=True)
async def reserve(event: OrderPlaced, ctx: Context) -> None:
    await create_tables()
    async with ctx.transaction() as tx:
        ns = tx.namespace
        taken = await tx.execute(
            f"UPDATE {ns}stock SET available = available - ? WHERE sku = ? AND available >= ?",
            event.quantity,
            event.sku,
            event.quantity,
        )
        status = "reserved" if taken else "rejected"
        await tx.execute(
            f"INSERT INTO {ns}reservations VALUES (?, ?, ?, ?)",
            event.order_id,
            event.sku,
            event.quantity,
            status,
        )
        if status == "rejected":
            await tx.publish(
                StockRejected(
                    order_id=event.order_id,
                    sku=event.sku,
                    quantity=event.quantity,
                    reason="out of stock",
                )
            )
        else:
            await tx.publish(
                StockReserved(
                    order_id=event.order_id,
                    sku=event.sku,
                    quantity=event.quantity,
                    amount_cents=event.amount_cents,
                )
            )


@service.on(PaymentFailed, inbox=True)
async def release(event: PaymentFailed, ctx: Context) -> None:
    await create_tables()
    async with ctx.transaction() as tx:
        ns = tx.namespace
        rows = await tx.fetch(
            f"SELECT sku, quantity, status FROM {ns}reservations WHERE order_id = ?",
            event.order_id,
        )
        if not rows:
            ctx.logger.warning("payment failed for unknown reservation %s", event.order_id)
            return
        sku, quantity, status = rows[0]
        if status == "reserved":
            await tx.execute(
                f"UPDATE {ns}stock SET available = available + ? WHERE sku = ?", quantity, sku
            )
            await tx.execute(
                f"UPDATE {ns}reservations SET status = 'released' WHERE order_id = ?",
                event.order_id,
            )
        await tx.publish(
            StockReleased(order_id=event.order_id, sku=str(sku), quantity=int(str(quantity)))
        )
