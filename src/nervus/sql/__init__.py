"""Database plumbing shared by the SQL log transports and the stores: connections
that keep SQLite off the event loop, and the group-committing writer."""
