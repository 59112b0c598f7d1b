"""The envelope: CloudEvents 1.0 attributes around an encoded payload.

Besides the required CloudEvents attributes (``id``, ``source``, ``specversion``,
``type``) and the optional ones (``subject``, ``time``, ``datacontenttype``,
``dataschema``), every nervus message carries the extension attributes
``correlationid`` (the conversation it belongs to), ``causationid`` (the id of the
message that caused it), ``partitionkey`` (the CloudEvents partitioning
extension) and the W3C ``traceparent`` / ``tracestate``.

On a broker the envelope travels in CloudEvents *binary content mode*: the data
is the message body and each attribute is a header named ``ce_<attribute>``;
``datacontenttype`` is the ``content-type`` header; ``traceparent`` and
``tracestate`` keep their W3C names.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from nervus.core._clock import rfc3339_now
from nervus.core._ids import new_id

SPEC_VERSION = "1.0"
JSON = "application/json"


class Envelope(msgspec.Struct, kw_only=True, gc=False):
    """One message: its CloudEvents attributes and its encoded ``data``."""

    id: str
    type: str
    source: str
    data: bytes
    specversion: str = SPEC_VERSION
    time: str = ""
    subject: str | None = None
    datacontenttype: str = JSON
    dataschema: str | None = None
    correlationid: str | None = None
    causationid: str | None = None
    partitionkey: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None

    @classmethod
    def new(
        cls,
        *,
        type: str,
        source: str,
        data: bytes,
        subject: str | None = None,
        partitionkey: str | None = None,
        cause: Envelope | None = None,
        datacontenttype: str = JSON,
        dataschema: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> Envelope:
        """A new envelope with a fresh UUIDv7 id and the current time.

        With a ``cause`` (the message being handled) the new message joins the
        cause's conversation: same ``correlationid``, ``causationid`` = cause's id,
        and the cause's trace context unless one is given.
        """
        event_id = new_id()
        if cause is not None:
            correlation = cause.correlationid or cause.id
            causation: str | None = cause.id
            if traceparent is None:
                traceparent, tracestate = cause.traceparent, cause.tracestate
        else:
            correlation, causation = event_id, None
        return cls(
            id=event_id,
            type=type,
            source=source,
            data=data,
            time=rfc3339_now(),
            subject=subject,
            datacontenttype=datacontenttype,
            dataschema=dataschema,
            correlationid=correlation,
            causationid=causation,
            partitionkey=partitionkey,
            traceparent=traceparent,
            tracestate=tracestate,
        )

    def to_headers(self) -> dict[str, str]:
        """The attributes as binary-content-mode headers (``ce_id``, ``content-type`` ...)."""
        headers = {
            "ce_specversion": self.specversion,
            "ce_id": self.id,
            "ce_type": self.type,
            "ce_source": self.source,
            "ce_time": self.time,
            "content-type": self.datacontenttype,
        }
        # written out rather than looped over: this runs for every message published
        if self.subject is not None:
            headers["ce_subject"] = self.subject
        if self.dataschema is not None:
            headers["ce_dataschema"] = self.dataschema
        if self.correlationid is not None:
            headers["ce_correlationid"] = self.correlationid
        if self.causationid is not None:
            headers["ce_causationid"] = self.causationid
        if self.partitionkey is not None:
            headers["ce_partitionkey"] = self.partitionkey
        if self.traceparent is not None:
            headers["traceparent"] = self.traceparent
        if self.tracestate is not None:
            headers["tracestate"] = self.tracestate
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], data: bytes) -> Envelope:
        """Rebuild an envelope from binary-content-mode headers and the body.

        Raises ``KeyError`` naming the first missing required header
        (``ce_id``, ``ce_type``, ``ce_source``).
        """
        get = headers.get
        return cls(
            id=headers["ce_id"],
            type=headers["ce_type"],
            source=headers["ce_source"],
            data=data,
            specversion=get("ce_specversion", SPEC_VERSION),
            time=get("ce_time", ""),
            subject=get("ce_subject"),
            datacontenttype=get("content-type", JSON),
            dataschema=get("ce_dataschema"),
            correlationid=get("ce_correlationid"),
            causationid=get("ce_causationid"),
            partitionkey=get("ce_partitionkey"),
            traceparent=get("traceparent"),
            tracestate=get("tracestate"),
        )
