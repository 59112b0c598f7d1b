"""The example shop: every order settles and the books balance, in one process on
the in-memory transport and in five processes on the embedded SQLite log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run_shop(tmp_path: Path, *args: str, transport: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERVUS_")}
    if transport is not None:
        env["NERVUS_TRANSPORT"] = transport
    done = subprocess.run(
        [sys.executable, "-m", "examples.shop", "--state", str(tmp_path / "shop"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def test_shop_in_one_process_on_the_memory_transport(tmp_path: Path) -> None:
    out = run_shop(tmp_path, "--orders", "300", "--in-process", transport="memory://shop")
    assert "every order settled, every customer notified, the books balance" in out


def test_shop_in_five_processes_on_the_embedded_log(tmp_path: Path) -> None:
    out = run_shop(tmp_path, "--orders", "400", "--timeout", "180")
    assert "every order settled, every customer notified, the books balance" in out
    assert "payment failed, stock released" in out
    assert (tmp_path / "shop" / "log.db").exists(), "the default is the embedded SQLite log"
    for name in ("orders", "inventory", "payments", "shipping", "notifications"):
        assert (tmp_path / "shop" / f"{name}.log").exists()
