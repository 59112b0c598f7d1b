"""``nervus run module:attr [--workers N]``: run a service until SIGTERM or SIGINT.

Exit codes: 0 after a graceful stop, 1 when the service (or a worker) failed,
2 when the target or the configuration is wrong (nothing was started).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from typing import Annotated

import typer

from nervus.cli._supervisor import Supervisor
from nervus.errors import ConfigurationError
from nervus.runtime import Service

log = logging.getLogger("nervus.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class TargetError(Exception):
    """The ``module:attr`` given to ``nervus run`` does not name a Service."""


def run_command(
    target: Annotated[
        str,
        typer.Argument(
            help="Where the Service is: 'package.module:attribute' "
            "(or just the module if it holds exactly one Service).",
            show_default=False,
        ),
    ],
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            "-w",
            min=1,
            help="Worker processes; they form one consumer group per group on the transport.",
        ),
    ] = 1,
    worker_id: Annotated[int | None, typer.Option("--worker-id", hidden=True)] = None,
) -> None:
    """Run a service: consume its groups until SIGTERM or SIGINT, then stop gracefully."""
    try:
        service = load_service(target)
        check_service(service, workers)
    except (ConfigurationError, TargetError) as exc:
        _print_problems(exc)
        raise typer.Exit(EXIT_USAGE) from None
    _configure_logging(service.settings.logging_level, worker_id)
    if workers == 1:
        code = run_service(service)
    else:
        argv = [sys.executable, "-m", "nervus", "run", target, "--workers", "1"]
        supervisor = Supervisor(argv, workers, stop_grace=service.settings.shutdown_timeout + 10.0)
        code = supervisor.run()
    raise typer.Exit(code)


def load_service(target: str) -> Service:
    """Import ``module[:attr]`` (the working directory first on ``sys.path``) and
    return the Service it names."""
    module_name, _, attr = target.partition(":")
    if not module_name or (":" in target and not attr):
        raise TargetError(f"{target!r}: expected 'module:attribute', e.g. 'shop.payments:service'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise TargetError(
                f"{target!r}: no module named {exc.name!r} (searched from {cwd}); "
                "run nervus from the directory that holds the package"
            ) from None
        raise
    if not attr:
        found = sorted(n for n, v in vars(module).items() if isinstance(v, Service))
        if len(found) != 1:
            what = f"{len(found)} Services ({', '.join(found)})" if found else "no Service"
            raise TargetError(
                f"{target!r}: the module holds {what}; name one as '{module_name}:NAME'"
            )
        attr = found[0]
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            services = sorted(n for n, v in vars(module).items() if isinstance(v, Service))
            hint = f"; Services there: {', '.join(services)}" if services else ""
            raise TargetError(
                f"{target!r}: {module_name} has no attribute {attr!r}{hint}"
            ) from None
    if not isinstance(obj, Service):
        raise TargetError(
            f"{target!r} is a {type(obj).__name__}, not a nervus Service; "
            "point at the object made by Service('name')"
        )
    return obj


def check_service(service: Service, workers: int) -> None:
    """Fail before anything starts if the transport URL is wrong or cannot serve
    ``workers`` processes."""
    transport = service.transport  # builds it from the URL; reports bad schemes and options
    if workers > 1 and not transport.features.cross_process_groups:
        reason = transport.features.reasons.get("cross_process_groups", "")
        raise ConfigurationError(
            [
                f"--workers {workers}: the transport ({service.settings.transport}) cannot share "
                f"a consumer group between processes{f' ({reason})' if reason else ''}; "
                "use --workers 1, or a transport such as sqlite:///path.db"
            ]
        )


def run_service(service: Service) -> int:
    """Run ``service`` in this process until it is stopped; the exit code."""
    try:
        asyncio.run(service.run())
    except ConfigurationError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 128 + 2
    except Exception:
        log.exception("service %r failed", service.name)
        return EXIT_FAILED
    return EXIT_OK


def _print_problems(exc: Exception) -> None:
    if isinstance(exc, ConfigurationError):
        typer.echo("nervus: invalid configuration:", err=True)
        for problem in exc.problems:
            typer.echo(f"  - {problem}", err=True)
    else:
        typer.echo(f"nervus: {exc}", err=True)


class _ContextFormatter(logging.Formatter):
    """Appends the handled event's type and ids when a record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        event_type = getattr(record, "nervus_type", None)
        if event_type is None:
            return text
        return (
            f"{text} [type={event_type} id={getattr(record, 'nervus_id', '?')} "
            f"correlation={getattr(record, 'nervus_correlation_id', '?')}]"
        )


def _configure_logging(level: int, worker_id: int | None) -> None:
    who = f"worker {worker_id}" if worker_id is not None else "%(process)d"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _ContextFormatter(f"%(asctime)s %(levelname)s [{who}] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_nervus", False):
            root.removeHandler(existing)
    handler._nervus = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
