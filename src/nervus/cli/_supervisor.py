"""Worker processes for ``nervus run --workers N``.

The parent starts N copies of the service (``nervus run TARGET --workers 1``);
they join the same consumer groups on the transport, which splits the
partitions among them. SIGTERM and SIGINT are forwarded to every worker, which
stops gracefully; the parent exits 0 when every worker exited 0.

A worker that exits while no stop was asked for has crashed: it is reported and
started again after a delay that doubles with each crash of that slot (0.5 s up
to 30 s). A slot that crashes more than ``max_crashes`` times within
``crash_window`` seconds, or a worker that exits with code 2 (its configuration
is wrong, so starting it again cannot help), stops every worker and the parent
exits non-zero (1, or 2 for configuration). A worker that dies of the forwarded
signal itself got it before it installed its handlers, so before it consumed
anything: that counts as a clean stop. Workers that do not stop within ``stop_grace`` seconds of the
stop request are killed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger("nervus.cli")

_POLL = 0.05


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    exit_code: int | None = None


class Supervisor:
    """Runs ``argv`` (plus ``--worker-id I``) in ``workers`` processes until stopped."""

    def __init__(
        self,
        argv: list[str],
        workers: int,
        *,
        stop_grace: float = 40.0,
        max_crashes: int = 5,
        crash_window: float = 60.0,
    ) -> None:
        self.argv = argv
        self.slots = [_Slot(i) for i in range(1, workers + 1)]
        self.stop_grace = stop_grace
        self.max_crashes = max_crashes
        self.crash_window = crash_window
        self._stop_signal: int | None = None
        self._stop_deadline: float | None = None
        self._failure: int | None = None
        self._received: int | None = None

    def run(self) -> int:
        """Start the workers, supervise them until they all exited; the exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for slot in self.slots:
                if self._received is None:
                    self._start(slot)
            log.info("started %d workers: %s", len(self.slots), self._pids())
            while any(s.process is not None or s.restart_at is not None for s in self.slots):
                self._forward_signal()
                self._reap()
                self._restart_due()
                self._enforce_deadline()
                time.sleep(_POLL)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._failure is not None:
            return self._failure
        codes = [s.exit_code for s in self.slots]
        if all(self._clean(c) for c in codes):
            log.info("all %d workers stopped cleanly", len(self.slots))
            return 0
        log.error("workers exited with codes %s", codes)
        return 1

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask every worker to stop gracefully; restart no more."""
        if self._stop_signal is None:
            self._stop_signal = sig
            self._stop_deadline = time.monotonic() + self.stop_grace
        for slot in self.slots:
            slot.restart_at = None
            if slot.process is not None and slot.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(sig)

    def _clean(self, code: int | None) -> bool:
        """Exit 0, or death by the stop signal itself: a worker that got it before it
        installed its handlers had not started consuming."""
        if code is None or code == 0:
            return True
        sig = self._stop_signal
        return sig is not None and code in (-sig, 128 + sig)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._received = signum  # acted on by the main loop, outside the handler

    def _forward_signal(self) -> None:
        signum, self._received = self._received, None
        if signum is None:
            return
        log.info("%s received; stopping %d workers", signal.Signals(signum).name, len(self.slots))
        self.stop(signum)

    def _pids(self) -> str:
        return ", ".join(str(s.process.pid) for s in self.slots if s.process is not None)

    def _start(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen([*self.argv, "--worker-id", str(slot.index)])
        slot.restart_at = None
        slot.exit_code = None

    def _reap(self) -> None:
        for slot in self.slots:
            process = slot.process
            if process is None:
                continue
            code = process.poll()
            if code is None:
                continue
            slot.process = None
            slot.exit_code = code
            if self._stop_signal is not None:
                level = logging.INFO if self._clean(code) else logging.WARNING
                log.log(
                    level, "worker %d (pid %d) exited with code %d", slot.index, process.pid, code
                )
                continue
            self._crashed(slot, process.pid, code)

    def _crashed(self, slot: _Slot, pid: int, code: int) -> None:
        log.error("worker %d (pid %d) exited unexpectedly with code %d", slot.index, pid, code)
        if code == 2:
            log.error("worker %d has a configuration problem; stopping every worker", slot.index)
            self._failure = 2
            self.stop()
            return
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - self.crash_window:
            slot.crashes.popleft()
        if len(slot.crashes) > self.max_crashes:
            log.error(
                "worker %d crashed %d times within %.0f s; stopping every worker",
                slot.index,
                len(slot.crashes),
                self.crash_window,
            )
            self._failure = 1
            self.stop()
            return
        delay = min(30.0, 0.5 * 2 ** (len(slot.crashes) - 1))
        log.warning("restarting worker %d in %.1f s", slot.index, delay)
        slot.restart_at = now + delay

    def _restart_due(self) -> None:
        if self._stop_signal is not None:
            return
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)
                assert slot.process is not None
                log.info("worker %d restarted (pid %d)", slot.index, slot.process.pid)

    def _enforce_deadline(self) -> None:
        if self._stop_deadline is None or time.monotonic() < self._stop_deadline:
            return
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                log.error(
                    "worker %d (pid %d) did not stop within %.0f s; killing it",
                    slot.index,
                    slot.process.pid,
                    self.stop_grace,
                )
                slot.process.kill()
        self._stop_deadline = None
