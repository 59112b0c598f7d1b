"""An example shop: orders, inventory, payments, shipping and notifications as
separate services that react to each other's events (choreography).

    OrderPlaced ─▶ inventory ─▶ StockReserved ─▶ payments ─▶ PaymentCaptured ─▶ shipping
         │                 └──▶ StockRejected ─▶ orders ─▶ OrderCancelled          │
         │                  PaymentFailed ─▶ inventory ─▶ StockReleased ─▶ orders   │
         │                                       ShipmentDispatched ◀──────────────┘
         │                                              └──▶ orders ─▶ OrderCompleted
         └── OrderCompleted / OrderCancelled ─▶ notifications ─▶ NotificationSent

Payments fail on purpose for a share of the orders; inventory then releases the
stock it reserved and orders cancels: compensation by events, no coordinator.
"""
