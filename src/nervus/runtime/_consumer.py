"""One consumer group's loop: fetch within the in-flight bound, decode, dispatch by
key, retry, and settle in batches.

Three kinds of task cooperate on one subscription:

- the *fetch loop* asks for as many deliveries as there are free slots
  (``max_in_flight`` minus deliveries fetched and not yet settled); when no slot
  is free it waits until a settlement frees one (backpressure). It decodes each
  delivery; what cannot be decoded is dead-lettered at once, types this group
  does not handle are acknowledged and skipped, the rest go to the dispatcher;
- the dispatcher's *workers* run handlers, one at a time per key, and queue the
  outcome: an ack, a nack with a backoff delay, or a dead-letter;
- the *settler* takes every queued outcome at each turn and settles them, acks
  in one call, then frees their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any

from nervus.codecs import JSON_CODEC
from nervus.core import Clock, Envelope, TypeRegistry
from nervus.errors import DecodeError, NervusError, TransportClosed
from nervus.runtime._context import CURRENT, Context
from nervus.runtime._dispatch import KeyedDispatcher
from nervus.runtime._handlers import Registration
from nervus.runtime._outbox import Inbox, ServiceTransaction
from nervus.runtime._outgoing import group_by_channel
from nervus.runtime._publishing import Outage
from nervus.runtime._retry import RetryPolicy
from nervus.transports import DeadLetterReason, Delivery, OutgoingMessage, Subscription, Transport

log = logging.getLogger("nervus.runtime")

POLL_SECONDS = 1.0
"""Longest wait in one fetch call."""

_REQUIRED_HEADERS = ("ce_id", "ce_type", "ce_source")
JSON = JSON_CODEC.content_type

_Work = tuple[Delivery, Envelope, Any, Registration]


class GroupConsumer:
    """Consumes one group's channels for one service until stopped."""

    def __init__(
        self,
        *,
        service: str,
        group: str,
        registrations: Mapping[str, Registration],
        transport: Transport,
        max_in_flight: int,
        retry: RetryPolicy,
        registry: TypeRegistry,
        clock: Clock,
        on_failure: Callable[[BaseException], None],
        publish: Callable[[str, list[OutgoingMessage]], Awaitable[None]],
        inbox: Inbox | None = None,
        transactions: Callable[[Context], AbstractAsyncContextManager[ServiceTransaction]]
        | None = None,
    ) -> None:
        self.service = service
        self.group = group
        self.channels = tuple(sorted({r.channel for r in registrations.values()}))
        self._registrations = dict(registrations)
        self._transport = transport
        self._max_in_flight = max_in_flight
        self._retry = retry
        self._registry = registry
        self._clock = clock
        self._on_failure = on_failure
        self._publish = publish
        self._inbox = inbox
        self._transactions = transactions
        self.fetch_outage = Outage()
        self._source = "/nervus/" + service
        self._sub: Subscription | None = None
        self._dispatcher: KeyedDispatcher[_Work] | None = None
        self._in_flight = 0
        self._peak_in_flight = 0
        self._slots = asyncio.Event()
        self._stopping = False
        self._acks: list[Delivery] = []
        self._others: list[tuple[Delivery, float | DeadLetterReason]] = []
        self._settle_wake = asyncio.Event()
        self._settler_done = False
        self._fetch_task: asyncio.Task[None] | None = None
        self._settle_task: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        """Deliveries fetched and not yet settled."""
        return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most deliveries that were in flight at once."""
        return self._peak_in_flight

    async def start(self) -> None:
        for channel in self.channels:
            await self._transport.ensure_channel(channel)
        self._sub = await self._transport.subscribe(
            self.channels, self.group, max_in_flight=self._max_in_flight
        )
        self._dispatcher = KeyedDispatcher(self._process, max_workers=self._max_in_flight)
        name = f"nervus-{self.service}-{self.group}"
        self._fetch_task = asyncio.create_task(
            self._guard(self._fetch_loop()), name=name + "-fetch"
        )
        self._settle_task = asyncio.create_task(
            self._guard(self._settle_loop()), name=name + "-settle"
        )

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception as exc:
            log.error(
                "consumer group %r of service %r failed: %r",
                self.group,
                self.service,
                exc,
                exc_info=exc,
            )
            self._on_failure(exc)

    # -- fetching ---------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        sub = self._sub
        assert sub is not None
        failures = 0
        while not self._stopping:
            free = self._max_in_flight - self._in_flight
            if free <= 0:
                self._slots.clear()
                await self._slots.wait()
                continue
            try:
                deliveries = await sub.fetch(free, POLL_SECONDS)
            except NervusError as exc:
                if self._stopping and isinstance(exc, TransportClosed):
                    return
                if not exc.retryable:
                    raise
                failures += 1
                self.fetch_outage.failed(f"fetching for group {self.group!r}", exc)
                await self._clock.sleep(min(self._retry.backoff(failures), 5.0))
                continue
            if failures:
                failures = 0
                self.fetch_outage.recovered(f"fetching for group {self.group!r}")
            if deliveries:
                self._accept(deliveries)

    def _accept(self, deliveries: Sequence[Delivery]) -> None:
        self._in_flight += len(deliveries)
        if self._in_flight > self._peak_in_flight:
            self._peak_in_flight = self._in_flight
        registrations = self._registrations
        dispatcher = self._dispatcher
        assert dispatcher is not None
        decode = JSON_CODEC.decode
        for d in deliveries:
            headers = d.headers
            type_name = headers.get("ce_type")
            reg = registrations.get(type_name) if type_name is not None else None
            if reg is None or "ce_id" not in headers or "ce_source" not in headers:
                self._reject(d, type_name)
                continue
            content_type = headers.get("content-type")
            if content_type is not None and not content_type.startswith(JSON):
                self._dead_letter_now(
                    d,
                    "decode-error",
                    f"content type {content_type!r} is not supported; expected {JSON}",
                )
                continue
            try:
                event = decode(d.body, reg.event_type, type_name=type_name)
            except DecodeError as exc:
                self._dead_letter_now(d, "decode-error", str(exc), exc)
                continue
            envelope = Envelope.from_headers(headers, d.body)
            key = d.key if d.key is not None else envelope.partitionkey
            dispatcher.submit(key, (d, envelope, event, reg))

    def _reject(self, d: Delivery, type_name: str | None) -> None:
        missing = [h for h in _REQUIRED_HEADERS if h not in d.headers]
        if missing:
            self._dead_letter_now(
                d,
                "decode-error",
                f"not a CloudEvent: missing header(s) {', '.join(missing)} "
                f"(at {d.channel}[{d.partition}]@{d.offset})",
            )
        elif type_name is None or self._registry.get(type_name) is None:
            self._dead_letter_now(
                d,
                "unknown-type",
                f"no event class is declared for type {type_name!r} in service "
                f"{self.service!r}; import the module that declares it",
            )
        else:  # a known type that this group does not handle
            self._acks.append(d)
            self._settle_wake.set()

    def _dead_letter_now(
        self, d: Delivery, code: str, message: str, exc: BaseException | None = None
    ) -> None:
        log.error(
            "dead-lettering %s[%d]@%d for group %r: %s",
            d.channel,
            d.partition,
            d.offset,
            self.group,
            message,
        )
        reason = DeadLetterReason(
            code,
            message,
            error_type=None if exc is None else _qualified(exc),
            attempts=d.attempt,
        )
        self._others.append((d, reason))
        self._settle_wake.set()

    # -- handling ---------------------------------------------------------------------

    async def _process(self, work: _Work) -> None:
        d, envelope, event, reg = work
        runs = self._retry.immediate_retries + 1
        error: Exception | None = None
        inbox = self._inbox if reg.inbox else None
        for run in range(1, runs + 1):
            if inbox is not None:
                try:
                    seen = await inbox.seen(self.group, envelope.id)
                except Exception as exc:
                    error = exc
                    continue
                if seen:  # handled before: a redelivery
                    inbox.duplicates += 1
                    self._acks.append(d)
                    self._settle_wake.set()
                    return
            ctx = Context(
                envelope,
                d,
                group=self.group,
                service=self.service,
                logger=reg.logger,
                transactions=self._transactions,
                inbox=inbox is not None,
            )
            token = CURRENT.set(ctx)
            try:
                await reg.fn(event, ctx)
                staged = ctx.staged()
                if staged:
                    await self._publish_staged(staged)
                if inbox is not None and not ctx.recorded:
                    await inbox.record(self.group, envelope.id)
            except Exception as exc:
                error = exc
                log.warning(
                    "handler %s failed on %s %s (delivery %d, run %d of %d): %r",
                    reg.name,
                    envelope.type,
                    envelope.id,
                    d.attempt,
                    run,
                    runs,
                    exc,
                )
                if isinstance(exc, NervusError) and not exc.retryable:
                    break  # a refusal (DomainError ...): the same message meets it again
                continue
            finally:
                CURRENT.reset(token)
            self._acks.append(d)
            self._settle_wake.set()
            return
        assert error is not None
        permanent = isinstance(error, NervusError) and not error.retryable
        if permanent or self._retry.exhausted(d.attempt):
            text = "".join(traceback.format_exception(error))
            log.error(
                "dead-lettering %s %s for group %r after %d deliveries: %r",
                envelope.type,
                envelope.id,
                self.group,
                d.attempt,
                error,
                exc_info=error,
            )
            reason = DeadLetterReason(
                "handler-failed",
                f"{reg.name}: {error!r}",
                error_type=_qualified(error),
                traceback=text,
                attempts=d.attempt,
            )
            self._others.append((d, reason))
        else:
            delay = self._retry.backoff(d.attempt)
            self._others.append((d, delay))
        self._settle_wake.set()

    async def _publish_staged(self, staged: list[tuple[str, OutgoingMessage]]) -> None:
        if len(staged) == 1:
            channel, message = staged[0]
            await self._publish(channel, [message])
            return
        for channel, messages in group_by_channel(staged).items():
            await self._publish(channel, messages)

    # -- settling ---------------------------------------------------------------------

    async def _settle_loop(self) -> None:
        sub = self._sub
        assert sub is not None
        while True:
            await self._settle_wake.wait()
            self._settle_wake.clear()
            while self._acks or self._others:
                acks, self._acks = self._acks, []
                others, self._others = self._others, []
                if acks:
                    await self._settle(partial(sub.ack, acks))
                for d, how in others:
                    if isinstance(how, DeadLetterReason):
                        await self._settle(partial(sub.dead_letter, d, how))
                    else:
                        await self._settle(partial(sub.nack, d, how))
                self._in_flight -= len(acks) + len(others)
                self._slots.set()
            if self._settler_done:
                return

    async def _settle(self, call: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        while True:
            try:
                await call()
                return
            except NervusError as exc:
                if not exc.retryable or self._settler_done:
                    raise
                failures += 1
                delay = min(self._retry.backoff(failures, lambda: 0.0), 5.0)
                log.warning(
                    "settling for group %r failed (%s); retrying in %.1f s", self.group, exc, delay
                )
                await self._clock.sleep(delay)

    # -- stopping ---------------------------------------------------------------------

    def stop_fetching(self) -> None:
        """Fetch no more; work already fetched goes on.

        A fetch in progress is cancelled: whatever it would have returned stays
        unsettled, and the contract delivers it again to the partition's next owner.
        """
        self._stopping = True
        self._slots.set()
        if self._fetch_task is not None and not self._fetch_task.done():
            self._fetch_task.cancel()

    async def stop(self, deadline: float) -> None:
        """Stop fetching, let in-flight work finish until ``deadline`` (event-loop time),
        settle what finished, then close the subscription (commit, leave the group).
        Work unfinished at the deadline is cancelled and left unsettled."""
        self.stop_fetching()
        loop = asyncio.get_running_loop()
        if self._fetch_task is not None:
            await asyncio.gather(self._fetch_task, return_exceptions=True)
        if self._dispatcher is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._dispatcher.wait_idle(), timeout=max(0.0, deadline - loop.time())
                )
            left = await self._dispatcher.close()
            if left:
                log.warning(
                    "group %r: %d deliveries were not finished within the shutdown timeout; "
                    "they stay unacknowledged and will be delivered again",
                    self.group,
                    left,
                )
        if self._settle_task is not None:
            self._settler_done = True
            self._settle_wake.set()
            await asyncio.wait({self._settle_task}, timeout=max(1.0, deadline - loop.time()))
            if not self._settle_task.done():
                self._settle_task.cancel()
                await asyncio.gather(self._settle_task, return_exceptions=True)
        if self._sub is not None:
            await self._sub.close()


def _qualified(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
