"""``nervus run`` end to end: worker processes on one SQLite log, SIGTERM, crashes."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nervus import Event, Service, Settings

pytestmark = pytest.mark.slow

SERVICE = textwrap.dedent(
    """
    import os
    from pathlib import Path

    from nervus import Context, Event, Service

    HERE = Path(__file__).parent


    class JobQueued(Event, type="runcmd.job.queued.v1", key="job"):
        job: str


    service = Service("runcmd")


    @service.on(JobQueued)
    async def handle(event: JobQueued, ctx: Context) -> None:
        crash_marker = HERE / f"crash-{event.job}"
        if event.job.startswith("crash") and not crash_marker.exists():
            crash_marker.write_text("crashed once")
            os._exit(3)  # the worker dies before acknowledging
        with open(HERE / "handled" / f"{os.getpid()}.log", "a") as out:
            out.write(event.job + "\\n")
    """
)


class JobQueued(Event, type="runcmd.job.queued.v1", key="job"):
    job: str


def start(tmp_path: Path, workers: int) -> tuple[subprocess.Popen[bytes], Path, str]:
    (tmp_path / "runcmd_service.py").write_text(SERVICE)
    (tmp_path / "handled").mkdir()
    url = f"sqlite:///{tmp_path}/log.db?lease_seconds=2&synchronous=normal"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERVUS_")}
    env["NERVUS_TRANSPORT"] = url
    env["NERVUS_SHUTDOWN_TIMEOUT"] = "10"
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "nervus", "run", "runcmd_service:service", "-w", str(workers)],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return process, log_path, url


def wait_until(predicate: object, timeout: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; output:\n{log_path.read_text()}")
        time.sleep(0.05)


def split_evenly(tmp_path: Path) -> bool:
    """Both workers own half of the channel's partitions (read from the log's own tables)."""
    with sqlite3.connect(tmp_path / "log.db") as db:
        owned = db.execute(
            "SELECT member, count(*) FROM nervus_owners WHERE grp = 'runcmd' GROUP BY member"
        ).fetchall()
        (partitions,) = db.execute(
            "SELECT partitions FROM nervus_channels WHERE name = 'runcmd.job'"
        ).fetchone() or (0,)
    return len(owned) == 2 and all(count == partitions // 2 for _, count in owned)


def handled(tmp_path: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for path in (tmp_path / "handled").glob("*.log"):
        counts.update(path.read_text().split())
    return counts


def publish(url: str, jobs: list[str]) -> None:
    async def go() -> None:
        producer = Service("producer", settings=Settings(transport=url))
        await producer.publish_many([JobQueued(job=j) for j in jobs])
        await producer.stop()

    asyncio.run(go())


def stop(process: subprocess.Popen[bytes], log_path: Path) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"nervus run did not stop; output:\n{log_path.read_text()}") from None


def test_two_workers_share_the_group_and_stop_on_sigterm(tmp_path: Path) -> None:
    process, log_path, url = start(tmp_path, workers=2)
    try:
        wait_until(
            lambda: log_path.read_text().count("service 'runcmd' started") == 2,
            30,
            "both workers to start",
            log_path,
        )
        wait_until(lambda: split_evenly(tmp_path), 30, "the partitions to be split", log_path)
        jobs = [f"job-{i}" for i in range(300)]
        publish(url, jobs)
        wait_until(lambda: sum(handled(tmp_path).values()) >= len(jobs), 30, "the jobs", log_path)
        time.sleep(0.3)  # a duplicate, if any, would show up now
    finally:
        code = stop(process, log_path)
    output = log_path.read_text()
    assert code == 0, output
    counts = handled(tmp_path)
    assert set(counts) == set(jobs)
    assert set(counts.values()) == {1}, [j for j, c in counts.items() if c > 1]
    assert len(list((tmp_path / "handled").glob("*.log"))) <= 2
    assert "SIGTERM received; stopping 2 workers" in output
    assert output.count("service 'runcmd' stopped") == 2
    assert "all 2 workers stopped cleanly" in output


def test_a_crashed_worker_is_reported_and_restarted(tmp_path: Path) -> None:
    process, log_path, url = start(tmp_path, workers=1 + 1)
    try:
        wait_until(
            lambda: log_path.read_text().count("service 'runcmd' started") == 2,
            30,
            "both workers to start",
            log_path,
        )
        jobs = ["crash-1", *(f"job-{i}" for i in range(20))]
        publish(url, jobs)
        wait_until(lambda: set(handled(tmp_path)) == set(jobs), 40, "the jobs", log_path)
    finally:
        code = stop(process, log_path)
    output = log_path.read_text()
    assert code == 0, output
    assert "exited unexpectedly with code 3" in output
    assert "restarted" in output
    assert (tmp_path / "crash-crash-1").exists()


def test_configuration_problems_exit_2_before_starting(tmp_path: Path) -> None:
    (tmp_path / "runcmd_service.py").write_text(SERVICE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERVUS_")}
    env["NERVUS_TRANSPORT"] = "sqlite:///x.db?partitionz=3"
    env["NERVUS_MAX_INFLIGHT"] = "5"
    result = subprocess.run(
        [sys.executable, "-m", "nervus", "run", "runcmd_service:service", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert "NERVUS_MAX_INFLIGHT: unknown nervus setting; did you mean NERVUS_MAX_IN_FLIGHT?" in err
    assert "unknown option 'partitionz'" in err
    assert not (tmp_path / "x.db").exists()
