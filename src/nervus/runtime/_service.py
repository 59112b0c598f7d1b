"""``Service``: handlers, publishing and the consumer groups of one service."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import msgspec

from nervus.core import (
    REGISTRY,
    SYSTEM_CLOCK,
    Clock,
    Command,
    Message,
    TypeRegistry,
    channel_of,
    type_name,
)
from nervus.domain import Aggregate, CommandResult, Projection, Repository
from nervus.errors import ConfigurationError
from nervus.runtime import _publishing as publishing
from nervus.runtime._config import Settings
from nervus.runtime._consumer import GroupConsumer
from nervus.runtime._context import CURRENT, Context
from nervus.runtime._handlers import E, Handler, Registration, describe
from nervus.runtime._outbox import Inbox, OutboxRelay, ServiceTransaction, open_transaction
from nervus.runtime._outgoing import encode, group_by_channel
from nervus.runtime._relay import Relay
from nervus.runtime._retry import RetryPolicy
from nervus.runtime._sourcing import Sourcing
from nervus.storage import EventStore
from nervus.transports import OutgoingMessage, Transport, from_url

log = logging.getLogger("nervus.runtime")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")

_State = Literal["new", "open", "running", "stopping", "closed"]

A = TypeVar("A", bound=Aggregate)
C = TypeVar("C", bound=Command)


class GroupHealth(msgspec.Struct, frozen=True):
    """One consumer group of a service."""

    channels: list[str]
    in_flight: int
    fetching: bool


class Health(msgspec.Struct, frozen=True):
    """A service's health: ``healthy`` when running with no problem."""

    service: str
    state: str
    healthy: bool
    problems: list[str]
    groups: dict[str, GroupHealth]


class Service:
    """A named service: its handlers, its publishing, and its consumers.

    ::

        payments = Service("payments")

        @payments.on(OrderPlaced)                  # group defaults to the service name
        async def capture(event: OrderPlaced, ctx: Context) -> None:
            await ctx.publish(PaymentCaptured(order_id=event.order_id))

        async with payments:                       # consumers run inside the block
            await payments.publish(OrderPlaced(order_id="o-1", amount_cents=100))

        await payments.run()                       # or: until stopped or SIGTERM/SIGINT

    ``settings`` default to ``Settings.from_env()``, read when the service first
    needs them (so a module may declare its service before the environment is
    set, and ``nervus run`` checks them before anything starts); an explicit ``transport``
    replaces the one ``settings.transport`` names. The service connects its
    transport on first use and closes it when stopped.
    """

    def __init__(
        self,
        name: str,
        *,
        settings: Settings | None = None,
        transport: Transport | None = None,
        clock: Clock = SYSTEM_CLOCK,
        registry: TypeRegistry = REGISTRY,
        store: EventStore | None = None,
        relay: bool | None = None,
        outbox: bool = False,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigurationError(
                [f"Service name {name!r}: use letters, digits, '.', '_' or '-' (e.g. 'payments')"]
            )
        self.name = name
        self._settings = None if settings is None else settings.checked()
        self._retry: RetryPolicy | None = None
        self.source = "/nervus/" + name
        self._transport = transport
        self._clock = clock
        self._registry = registry
        self._groups: dict[str, dict[str, Registration]] = {}
        self._consumers: list[GroupConsumer] = []
        self._state: _State = "new"
        self._open_lock = asyncio.Lock()
        self._stop_requested: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._publish_outage = publishing.Outage()
        self._sourcing = Sourcing(self)
        if store is not None:
            self._sourcing.use_store(store)
        self._relay = relay
        self._outbox = outbox
        self.inbox = Inbox(lambda: self.store)
        self._outbox_relay: OutboxRelay | None = None
        self._outbox_task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        """``new``, ``open`` (transport connected), ``running``, ``stopping`` or ``closed``."""
        return self._state

    def __repr__(self) -> str:
        return f"Service({self.name!r}, state={self._state!r})"

    # -- declaring handlers ---------------------------------------------------------

    def on(
        self, event_type: type[E], *, group: str | None = None, inbox: bool = False
    ) -> Callable[[Handler[E]], Handler[E]]:
        """Register the decorated ``async def handler(event, ctx)`` for ``event_type``
        in consumer ``group`` (default: the service name). Each group reads the
        channels of the types it handles; each type has one handler per group.

        ``inbox=True`` gives the handler exactly-once effects in the store: a
        message the group handled before is acknowledged without running it, and
        ``ctx.transaction()`` records the message with the handler's writes."""
        group_name = self.name if group is None else group
        if not _NAME.match(group_name):
            raise ConfigurationError(
                [f"group={group_name!r}: use letters, digits, '.', '_' or '-' (e.g. 'payments')"]
            )
        name = type_name(event_type)
        channel = channel_of(event_type)

        def register(fn: Handler[E]) -> Handler[E]:
            if self._state != "new":
                raise ConfigurationError(
                    [f"{describe(fn)}: register handlers before service {self.name!r} starts"]
                )
            if not inspect.iscoroutinefunction(fn):
                raise ConfigurationError(
                    [f"{describe(fn)}: a handler must be 'async def handler(event, ctx)'"]
                )
            handlers = self._groups.setdefault(group_name, {})
            existing = handlers.get(name)
            if existing is not None:
                raise ConfigurationError(
                    [
                        f"{describe(fn)}: {name!r} already has handler {existing.name} in group "
                        f"{group_name!r}; one handler per type per group - give the second "
                        "its own group (each group receives every event)"
                    ]
                )
            handlers[name] = Registration(
                group=group_name,
                event_type=event_type,
                type_name=name,
                channel=channel,
                fn=fn,
                name=describe(fn),
                logger=logging.getLogger(getattr(fn, "__module__", None) or "nervus.handlers"),
                inbox=inbox,
            )
            return fn

        return register

    @property
    def settings(self) -> Settings:
        """The settings: as given, or read from the environment on first use."""
        if self._settings is None:
            self._settings = Settings.from_env()
        return self._settings

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy the settings describe."""
        if self._retry is None:
            self._retry = RetryPolicy.from_settings(self.settings)
        return self._retry

    @property
    def registrations(self) -> list[Registration]:
        """Every handler, by group then type name."""
        return [r for g in sorted(self._groups) for _, r in sorted(self._groups[g].items())]

    @property
    def consumers(self) -> list[GroupConsumer]:
        """The running consumer groups (empty unless started)."""
        return list(self._consumers)

    # -- event sourcing -------------------------------------------------------------

    @property
    def store(self) -> EventStore:
        """The event store (built from ``settings.store`` on first use)."""
        return self._sourcing.store

    def repository(self, aggregate: type[A], *, snapshot_every: int | None = None) -> Repository[A]:
        """A repository of ``aggregate`` in the service's store."""
        return self._sourcing.repository(aggregate, snapshot_every=snapshot_every)

    def command(
        self,
        command_type: type[C],
        *,
        aggregate: type[A],
        snapshot_every: int | None = None,
    ) -> Callable[[Callable[[A, C], Any]], Callable[[A, C], Any]]:
        """Register ``def handler(aggregate, command) -> events`` (plain or async) for
        ``command_type``, executed on the aggregate its key field names. Commands run
        in process with ``execute`` and arrive through the transport (group
        ``<service>.commands``); the events are appended to the store, and the
        service's relay publishes them."""
        return self._sourcing.command(command_type, aggregate, snapshot_every)

    async def execute(self, command: Command) -> CommandResult:
        """Execute ``command`` in process: the aggregate's new version, or the
        ``DomainError`` its rules raised. Called from a handler, the command's events
        join the handled message's conversation."""
        ctx = CURRENT.get()
        return await self._sourcing.execute(command, cause=None if ctx is None else ctx.envelope)

    def projection(self, projection: Projection, *, batch: int = 500) -> None:
        """Keep ``projection``'s read model up to date while the service runs."""
        if self._state != "new":
            raise ConfigurationError(
                [f"projection {projection.name!r}: register it before {self.name!r} starts"]
            )
        self._sourcing.projection(projection, batch=batch)

    @property
    def projections(self) -> list[Projection]:
        """The projections declared on this service."""
        return self._sourcing.declared_projections

    @property
    def relay(self) -> Relay | None:
        """The relay publishing the store's events, while the service runs one."""
        return self._sourcing.relay

    # -- the outbox and the inbox -----------------------------------------------------

    def transaction(self) -> AbstractAsyncContextManager[ServiceTransaction]:
        """One store transaction for your own SQL and the events you publish in it
        (``tx.publish``: sent through the outbox if, and once, it commits). Inside a
        handler it is ``ctx.transaction()``."""
        ctx = CURRENT.get()
        if ctx is not None:
            return ctx.transaction()
        return open_transaction(self.store, source=self.source, cause=None, inbox=None)

    @contextlib.asynccontextmanager
    async def _handler_transaction(self, ctx: Context) -> AsyncIterator[ServiceTransaction]:
        await self._sourcing.connect()
        record = (ctx.group, ctx.envelope.id) if ctx.inbox and not ctx.recorded else None
        async with open_transaction(
            self.store, source=self.source, cause=ctx.envelope, inbox=record
        ) as tx:
            yield tx
        if record is not None:
            ctx.recorded = True

    @property
    def outbox_relay(self) -> OutboxRelay | None:
        """The relay publishing the outbox, while the service runs one."""
        return self._outbox_relay

    def _uses_outbox(self) -> bool:
        if self._relay is not None:
            return self._relay and (self._outbox or self._has_inbox())
        return self.settings.relay and (self._outbox or self._has_inbox())

    def _has_inbox(self) -> bool:
        return any(r.inbox for g in self._groups.values() for r in g.values())

    def _relays_log(self) -> bool:
        if self._relay is not None:
            return self._relay
        return self.settings.relay and bool(self._sourcing.commands)

    # -- the transport --------------------------------------------------------------

    @property
    def transport(self) -> Transport:
        """The transport (built from ``settings.transport`` on first use)."""
        if self._transport is None:
            self._transport = from_url(self.settings.transport)
        return self._transport

    async def open(self) -> None:
        """Build and connect the transport. Publishing and ``start`` do it when needed."""
        if self._state != "new":
            if self._state == "closed":
                raise ConfigurationError(
                    [f"service {self.name!r} is stopped; create a new Service to run again"]
                )
            return
        async with self._open_lock:
            if self._state == "new":
                await self.transport.connect()
                self._state = "open"

    # -- publishing -----------------------------------------------------------------

    async def publish(
        self, event: Message, *, key: str | None = None, subject: str | None = None
    ) -> None:
        """Publish ``event`` to its channel; returns once the transport durably accepted it.

        Called while a handler runs, the event joins the handled event's
        conversation (correlation and causation ids) but is published at once;
        use ``ctx.publish`` to publish only if the handler succeeds.
        """
        if self._state == "new":
            await self.open()
        ctx = CURRENT.get()
        channel, message = encode(
            event,
            source=self.source,
            key=key,
            subject=subject,
            cause=None if ctx is None else ctx.envelope,
        )
        await self._publish(channel, [message])

    async def _publish(self, channel: str, messages: list[OutgoingMessage]) -> None:
        await publishing.publish(
            self.transport,
            channel,
            messages,
            timeout=self.settings.publish_timeout,
            retry=self.retry,
            clock=self._clock,
            outage=self._publish_outage,
        )

    async def publish_many(self, events: Iterable[Message]) -> None:
        """Publish several events, one transport call per channel, in order per channel."""
        if self._state == "new":
            await self.open()
        ctx = CURRENT.get()
        cause = None if ctx is None else ctx.envelope
        staged = [encode(e, source=self.source, cause=cause) for e in events]
        for channel, messages in group_by_channel(staged).items():
            await self._publish(channel, messages)

    # -- health ---------------------------------------------------------------------

    def health(self) -> Health:
        """Whether the service is running and reaching its broker: what a liveness or
        readiness probe, or a dashboard, asks. A broker outage shows as problems here
        (and as warnings in the log) while publishers and consumers retry."""
        problems = []
        outage = self._publish_outage.describe("publishing")
        if outage is not None:
            problems.append(outage)
        groups = {}
        for consumer in self._consumers:
            failing = consumer.fetch_outage.describe(f"group {consumer.group!r}: fetching")
            if failing is not None:
                problems.append(failing)
            groups[consumer.group] = GroupHealth(
                channels=list(consumer.channels),
                in_flight=consumer.in_flight,
                fetching=failing is None,
            )
        problems += self._sourcing.problems()
        if self._outbox_relay is not None and self._outbox_relay.error:
            problems.append(f"outbox relay: {self._outbox_relay.error}")
        if self._failure is not None:
            problems.append(f"a consumer failed: {self._failure!r}")
        return Health(
            service=self.name,
            state=self._state,
            healthy=self._state == "running" and not problems,
            problems=problems,
            groups=groups,
        )

    # -- running --------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and start one consumer per group. Fails before any handler runs if
        the transport URL is wrong or the broker cannot be reached."""
        await self.open()
        if self._state != "open":
            raise ConfigurationError([f"service {self.name!r} is already {self._state}"])
        self._state = "running"
        if self._stop_requested is None:
            self._stop_requested = asyncio.Event()
        try:
            relay = self._relays_log()
            if self._sourcing.active or relay:
                await self._sourcing.start(relay=relay)
            if self._outbox or self._has_inbox():
                await self._sourcing.connect()  # inboxes are read before a handler runs
            if self._uses_outbox():
                self._outbox_relay = OutboxRelay(
                    self.store,
                    self._publish,
                    retention=self.settings.outbox_retention,
                    lease_seconds=self.settings.relay_lease,
                )
                self._outbox_task = asyncio.create_task(self._outbox_relay.run(), name="outbox")
            for group, registrations in sorted(self._groups.items()):
                consumer = GroupConsumer(
                    service=self.name,
                    group=group,
                    registrations=registrations,
                    transport=self.transport,
                    max_in_flight=self.settings.max_in_flight,
                    retry=self.retry,
                    registry=self._registry,
                    clock=self._clock,
                    on_failure=self._consumer_failed,
                    publish=self._publish,
                    inbox=self.inbox,
                    transactions=self._handler_transaction,
                )
                await consumer.start()
                self._consumers.append(consumer)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "service %r started: %s",
            self.name,
            ", ".join(f"group {c.group!r} on {', '.join(c.channels)}" for c in self._consumers)
            or "no handlers",
        )

    def _consumer_failed(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self.request_stop()

    def request_stop(self) -> None:
        """Ask ``run()`` to stop gracefully (what SIGTERM and SIGINT do)."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def stop(self) -> None:
        """Stop gracefully: fetch no more, let in-flight work finish within
        ``settings.shutdown_timeout``, settle it, close subscriptions (committing)
        and the transport. Work unfinished by then stays unacknowledged and is
        delivered again later. Raises the error that made a consumer fail, if any.

        Calls made while a stop is under way wait for that stop to finish."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self._state = "stopping"
        self.request_stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.stop_fetching()
        try:
            results = await asyncio.gather(
                *(c.stop(deadline) for c in consumers), return_exceptions=True
            )
            for consumer, result in zip(consumers, results, strict=True):
                if isinstance(result, BaseException):
                    log.error("closing group %r failed: %r", consumer.group, result)
                    if self._failure is None:
                        self._failure = result
            await self._sourcing.stop()  # the relays publish through the transport
            if self._outbox_task is not None:
                self._outbox_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._outbox_task
            if self._transport is not None:
                await self._transport.close()
            await self._sourcing.close()
        finally:
            self._state = "closed"
            if self.inbox.duplicates:
                log.info(
                    "service %r: the inbox suppressed %d redelivered messages",
                    self.name,
                    self.inbox.duplicates,
                )
            log.info("service %r stopped", self.name)
        if self._failure is not None:
            raise self._failure

    async def run(self) -> None:
        """Start, run until ``request_stop()``, SIGTERM or SIGINT (or until a consumer
        fails), then stop gracefully."""
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._signalled, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or a platform without signal handlers
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    def _signalled(self, sig: signal.Signals) -> None:
        if self._stop_requested is not None and self._stop_requested.is_set():
            log.warning("%s received again; still stopping service %r", sig.name, self.name)
            return
        log.info("%s received; stopping service %r", sig.name, self.name)
        self.request_stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if e is None:
            await self.stop()
            return
        try:
            await self.stop()
        except Exception as stop_error:
            log.error("stopping service %r failed: %r", self.name, stop_error)
