"""Where each shop service keeps its own tables: one SQLite file per service."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

STATE_DIR_VARIABLE = "SHOP_STATE_DIR"


def state_dir() -> Path:
    path = Path(os.environ.get(STATE_DIR_VARIABLE, ".nervus/shop"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_db(service: str, schema: str) -> sqlite3.Connection:
    """The service's own database (WAL), with ``schema`` applied."""
    db = sqlite3.connect(state_dir() / f"{service}.db", isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(schema)
    return db
