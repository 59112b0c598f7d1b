"""A message's headers as NATS headers, and back.

NATS headers are lines of ``Name: value``: the client replaces line breaks in a
value with spaces and trims it, so a value holding line breaks (a dead letter's
traceback) or starting or ending with white space would arrive changed. Such
values travel percent-encoded instead (``%`` as ``%25``, CR as ``%0D``, LF as
``%0A``, white space at either end as its UTF-8 bytes, e.g. ``%20``), and the
``nervus_encoded`` header lists their names, comma-separated (header names cannot
hold commas). A subscription decodes the values it names and drops it, so a
delivery carries the headers that were published, as on every other transport.
Values that need none of this (nearly all) go as they are, and a message without
``nervus_encoded`` (from a plain NATS client) is read as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote, unquote

KEY_HEADER = "ce_partitionkey"
"""The header carrying a message's partition key (the CloudEvents partitioning
extension), as NATS messages have no key of their own."""

MSG_ID_HEADER = "Nats-Msg-Id"
"""JetStream drops a publish whose id it saw within ``duplicate_window``; nervus sets
it to ``ce_id``."""

ENCODED_HEADER = "nervus_encoded"
"""The names of the headers whose values are percent-encoded, comma-separated."""


def to_nats(key: str | None, headers: Mapping[str, str]) -> dict[str, str]:
    """The NATS headers of a message: its own, its key, ``ce_id`` as the message id,
    and the values NATS would change percent-encoded."""
    out = dict(headers)
    if key is not None:
        out[KEY_HEADER] = key
    ce_id = out.get("ce_id")
    if ce_id:
        out[MSG_ID_HEADER] = ce_id
    # The common case in one pass over all values: no white space at all.
    joined = "|".join(out.values())
    words = joined.split(None, 1)
    if len(words) == 1 and len(words[0]) == len(joined):
        return out
    encoded = [name for name, value in out.items() if _changed_by_nats(value)]
    for name in encoded:
        out[name] = _encode(out[name])
    if encoded:
        out[ENCODED_HEADER] = ",".join(encoded)
    return out


def from_nats(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A delivery's headers: the message's own, decoded where ``nervus_encoded``
    says, without the message id nervus added."""
    out = dict(headers) if headers else {}
    encoded = out.pop(ENCODED_HEADER, None)
    if encoded is not None:
        for name in encoded.split(","):
            value = out.get(name)
            if value is not None:
                out[name] = unquote(value)
    if out.get(MSG_ID_HEADER) == out.get("ce_id"):
        out.pop(MSG_ID_HEADER, None)
    return out


def _changed_by_nats(value: str) -> bool:
    return "\n" in value or "\r" in value or value.strip() != value


def _encode(value: str) -> str:
    text = value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    middle = text.strip()
    if not middle:
        return quote(text, safe="")
    start = len(text) - len(text.lstrip())
    end = start + len(middle)
    return quote(text[:start], safe="") + middle + quote(text[end:], safe="")
