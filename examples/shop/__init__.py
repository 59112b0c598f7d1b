"""An example shop: orders, inventory, payments, shipping and notifications as
separate services that react to each other's events (choreography).

    PlaceOrder ─▶ orders ─▶ OrderPlaced ─▶ inventory ─▶ StockReserved ─▶ payments
                                 │                └──▶ StockRejected ─▶ orders ─▶ OrderCancelled
                                 │  PaymentFailed ─▶ inventory ─▶ StockReleased ─▶ orders
                                 │  PaymentCaptured ─▶ shipping ─▶ ShipmentDispatched
                                 │                                  └──▶ orders ─▶ OrderCompleted
                                 └── OrderCompleted / OrderCancelled ─▶ notifications

Orders is event-sourced: each order is an aggregate whose events are its state,
appended to the orders' event store and published by the store's relay; the
order-history projection keeps a read model of every order. Payments fail on
purpose for a share of the orders; inventory then releases the stock it reserved
and orders cancels: compensation by events, no coordinator.
"""
