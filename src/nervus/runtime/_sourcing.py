"""Event sourcing in a service: commands on aggregates, projections and the relay.

A service that declares commands keeps its aggregates in its store
(``settings.store``); ``execute`` runs a command in process, and the same
command published to the command's channel is executed by the service's
``<service>.commands`` consumer group (a ``DomainError`` dead-letters it at once
with its message; a redelivered command is recognised and not executed twice).
While the service runs, its projections follow the store's log, and a relay
publishes what the store records to the transport (the log is the outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from nervus.core import Command, Event, Message, type_name
from nervus.domain import (
    Aggregate,
    CommandResult,
    Projection,
    ProjectionRunner,
    Repository,
)
from nervus.errors import ConfigurationError
from nervus.runtime._relay import Relay
from nervus.storage import EventStore

if TYPE_CHECKING:
    from nervus.runtime._context import Context
    from nervus.runtime._service import Service

log = logging.getLogger("nervus.runtime")

C = TypeVar("C", bound=Command)
A = TypeVar("A", bound=Aggregate)

CommandHandler = Callable[[Any, Any], Iterable[Event] | Awaitable[Iterable[Event]]]
"""``(aggregate, command) -> events``, plain or async."""


@dataclass(frozen=True, slots=True)
class CommandRegistration:
    command_type: type[Command]
    aggregate: type[Aggregate]
    snapshot_every: int | None
    fn: CommandHandler


class Sourcing:
    """The event-sourcing side of one service (see the module docstring)."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._store: EventStore | None = None
        self.commands: dict[type[Command], CommandRegistration] = {}
        self._repositories: dict[tuple[type[Aggregate], int | None], Repository[Any]] = {}
        self._projections: list[tuple[Projection, int]] = []
        self.projections: list[ProjectionRunner] = []  # running ones
        self.relay: Relay | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._connected = False
        self._connecting = asyncio.Lock()

    @property
    def store(self) -> EventStore:
        if self._store is None:
            from nervus.storage import store_from_url

            self._store = store_from_url(self._service.settings.store, key="NERVUS_STORE")
        return self._store

    def use_store(self, store: EventStore) -> None:
        self._store = store

    @property
    def active(self) -> bool:
        return bool(self.commands or self._projections)

    def repository(self, aggregate: type[A], *, snapshot_every: int | None = None) -> Repository[A]:
        key = (aggregate, snapshot_every)
        repo = self._repositories.get(key)
        if repo is None:
            repo = Repository(
                self.store, aggregate, source=self._service.source, snapshot_every=snapshot_every
            )
            self._repositories[key] = repo
        return repo

    def command(
        self,
        command_type: type[C],
        aggregate: type[A],
        snapshot_every: int | None,
    ) -> Callable[[Callable[[A, C], Any]], Callable[[A, C], Any]]:
        name = type_name(command_type)
        if command_type.__message_key__ is None:
            raise ConfigurationError(
                [
                    f"{command_type.__qualname__}: a command executed on an aggregate names the "
                    f"aggregate id field with key=, e.g. class {command_type.__name__}"
                    f"(Command, type={name!r}, key='order_id')"
                ]
            )
        if command_type in self.commands:
            raise ConfigurationError([f"{name!r} already has a command handler"])
        if snapshot_every is not None and snapshot_every < 1:
            raise ConfigurationError([f"snapshot_every={snapshot_every} must be 1 or more"])

        def register(fn: Callable[[A, C], Any]) -> Callable[[A, C], Any]:
            self.commands[command_type] = CommandRegistration(
                command_type, aggregate, snapshot_every, fn
            )

            async def from_transport(command: Message, ctx: Context) -> None:
                await self.execute(command, cause=ctx.envelope, deduplicate=True)  # type: ignore[arg-type]

            from_transport.__qualname__ = f"{getattr(fn, '__qualname__', 'command')}"
            from_transport.__module__ = getattr(fn, "__module__", __name__)
            self._service.on(command_type, group=f"{self._service.name}.commands")(from_transport)
            return fn

        return register

    async def execute(
        self, command: Command, *, cause: Any = None, deduplicate: bool = False
    ) -> CommandResult:
        registration = self.commands.get(type(command))
        if registration is None:
            known = ", ".join(sorted(type_name(c) for c in self.commands)) or "none"
            raise ConfigurationError(
                [
                    f"service {self._service.name!r} has no handler for command "
                    f"{type_name(type(command))!r}; its commands: {known}"
                ]
            )
        await self.connect()
        aggregate_id = command.partition_key()
        if not aggregate_id:
            raise ValueError(
                f"{type_name(type(command))}: the aggregate id field "
                f"{command.__message_key__!r} is empty"
            )
        fn = registration.fn

        def decide(aggregate: Aggregate) -> Any:
            return fn(aggregate, command)

        repository = self.repository(
            registration.aggregate, snapshot_every=registration.snapshot_every
        )
        return await repository.execute(aggregate_id, decide, cause=cause, deduplicate=deduplicate)

    def projection(self, projection: Projection, *, batch: int = 500) -> None:
        projection.handlers()  # reports a misdeclared projection now
        if any(p.name == projection.name for p, _ in self._projections):
            raise ConfigurationError([f"projection {projection.name!r} is registered twice"])
        self._projections.append((projection, batch))

    @property
    def declared_projections(self) -> list[Projection]:
        return [p for p, _ in self._projections]

    # -- running ------------------------------------------------------------------

    async def connect(self) -> None:
        if self._connected:
            return
        async with self._connecting:  # the first handler transactions all connect at once
            if not self._connected:
                await self.store.connect()
                self._connected = True

    async def start(self, *, relay: bool) -> None:
        await self.connect()
        self.projections = [
            ProjectionRunner(self.store, p, batch=batch) for p, batch in self._projections
        ]
        for runner in self.projections:
            await runner.setup()
            self._tasks.append(asyncio.create_task(runner.run(), name=f"projection {runner.name}"))
        if relay:
            self.relay = Relay(
                self.store,
                self._service._publish,
                lease_seconds=self._service.settings.relay_lease,
            )
            self._tasks.append(asyncio.create_task(self.relay.run(), name="relay"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def close(self) -> None:
        await self.stop()
        if self._store is not None and self._connected:
            self._connected = False
            await self._store.close()

    def problems(self) -> list[str]:
        problems = [f"projection {r.name!r}: {r.error}" for r in self.projections if r.error]
        if self.relay is not None and self.relay.error:
            problems.append(f"relay: {self.relay.error}")
        return problems
