"""Orders: keeps each order's status and closes it when it ships or is cancelled."""

from __future__ import annotations

import sqlite3

from examples.shop._state import open_db
from examples.shop.events import (
    OrderCancelled,
    OrderCompleted,
    OrderPlaced,
    ShipmentDispatched,
    StockRejected,
    StockReleased,
)
from nervus import Context, Service

service = Service("orders")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, status TEXT NOT NULL, amount_cents INTEGER NOT NULL
);
"""
_db: sqlite3.Connection | None = None


def db() -> sqlite3.Connection:
    global _db
    if _db is None:
        _db = open_db("orders", _SCHEMA)
    return _db


def _set_status(order_id: str, status: str, amount_cents: int = 0) -> None:
    con = db()
    with con:
        con.execute(
            "INSERT INTO orders (order_id, status, amount_cents) VALUES (?, ?, ?) "
            "ON CONFLICT (order_id) DO UPDATE SET status = excluded.status "
            "WHERE orders.status = 'placed'",
            (order_id, status, amount_cents),
        )


@service.on(OrderPlaced)
async def placed(event: OrderPlaced, ctx: Context) -> None:
    con = db()
    with con:
        con.execute(
            "INSERT OR IGNORE INTO orders (order_id, status, amount_cents) VALUES (?, 'placed', ?)",
            (event.order_id, event.amount_cents),
        )


@service.on(ShipmentDispatched)
async def shipped(event: ShipmentDispatched, ctx: Context) -> None:
    _set_status(event.order_id, "completed")
    await ctx.publish(OrderCompleted(order_id=event.order_id))


@service.on(StockRejected)
async def rejected(event: StockRejected, ctx: Context) -> None:
    _set_status(event.order_id, "cancelled")
    await ctx.publish(OrderCancelled(order_id=event.order_id, reason=event.reason))


@service.on(StockReleased)
async def released(event: StockReleased, ctx: Context) -> None:
    _set_status(event.order_id, "cancelled")
    await ctx.publish(OrderCancelled(order_id=event.order_id, reason="payment failed"))
