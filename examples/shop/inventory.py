"""Inventory: reserves stock for new orders and releases it when payment fails."""

from __future__ import annotations

import sqlite3

from examples.shop._state import open_db
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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
    order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, quantity INTEGER NOT NULL,
    status TEXT NOT NULL  -- reserved | released
);
"""
_db: sqlite3.Connection | None = None


def db() -> sqlite3.Connection:
    global _db
    if _db is None:
        _db = open_db("inventory", _SCHEMA)
        _db.executemany(
            "INSERT OR IGNORE INTO stock (sku, available) VALUES (?, ?)", INITIAL_STOCK.items()
        )
    return _db


@service.on(OrderPlaced)
async def reserve(event: OrderPlaced, ctx: Context) -> None:
    con = db()
    with con:
        con.execute("BEGIN IMMEDIATE")
        known = con.execute(
            "SELECT status FROM reservations WHERE order_id = ?", (event.order_id,)
        ).fetchone()
        if known is None:
            taken = con.execute(
                "UPDATE stock SET available = available - ? WHERE sku = ? AND available >= ?",
                (event.quantity, event.sku, event.quantity),
            ).rowcount
            status = "reserved" if taken else "rejected"
            con.execute(
                "INSERT INTO reservations (order_id, sku, quantity, status) VALUES (?, ?, ?, ?)",
                (event.order_id, event.sku, event.quantity, status),
            )
        else:
            status = known[0]
    if status == "rejected":
        await ctx.publish(
            StockRejected(
                order_id=event.order_id,
                sku=event.sku,
                quantity=event.quantity,
                reason="out of stock",
            )
        )
    else:
        await ctx.publish(
            StockReserved(
                order_id=event.order_id,
                sku=event.sku,
                quantity=event.quantity,
                amount_cents=event.amount_cents,
            )
        )


@service.on(PaymentFailed)
async def release(event: PaymentFailed, ctx: Context) -> None:
    con = db()
    with con:
        con.execute("BEGIN IMMEDIATE")
        row = con.execute(
            "SELECT sku, quantity, status FROM reservations WHERE order_id = ?", (event.order_id,)
        ).fetchone()
        if row is None:
            ctx.logger.warning("payment failed for unknown reservation %s", event.order_id)
            return
        sku, quantity, status = row
        if status == "reserved":
            con.execute("UPDATE stock SET available = available + ? WHERE sku = ?", (quantity, sku))
            con.execute(
                "UPDATE reservations SET status = 'released' WHERE order_id = ?", (event.order_id,)
            )
    await ctx.publish(StockReleased(order_id=event.order_id, sku=sku, quantity=quantity))
