"""One placeholder style for SQL written against any store: ``?``.

SQLite takes ``?`` as it is; PostgreSQL drivers want ``$1``, ``$2`` ... A ``?``
inside a quoted string, a quoted identifier or a comment is left alone.
"""

from __future__ import annotations

import functools
import re

_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/|\?", re.DOTALL)


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """``sql`` with each ``?`` placeholder replaced by ``$1``, ``$2`` ... in order."""
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        if match.group(0) != "?":
            return match.group(0)
        count += 1
        return f"${count}"

    return _TOKENS.sub(replace, sql)
