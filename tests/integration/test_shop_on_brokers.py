"""The example shop runs unchanged on every broker: only ``NERVUS_TRANSPORT`` changes.

Five service processes, the orders flowing between them, compensation when a
payment fails, poison messages dead-lettered, and the books balance at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_shop(tmp_path: Path, transport: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NERVUS_")}
    env["NERVUS_TRANSPORT"] = transport
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.shop",
            "--orders",
            "300",
            "--timeout",
            "150",
            "--state",
            str(tmp_path / "shop"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = done.stdout + done.stderr
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted((tmp_path / "shop").glob("*.log"))
    )
    assert done.returncode == 0, output[-4000:] + logs
    assert "every order settled, every customer notified, the books balance" in output
    return output


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.kafka
def test_shop_on_kafka(tmp_path: Path, kafka_url: str) -> None:
    run_shop(tmp_path, kafka_url)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.nats
def test_shop_on_nats(tmp_path: Path, nats_url: str) -> None:
    run_shop(tmp_path, nats_url)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.redis
def test_shop_on_redis(tmp_path: Path, redis_url: str) -> None:
    run_shop(tmp_path, redis_url)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.rabbitmq
def test_shop_on_rabbitmq(tmp_path: Path, rabbitmq_url: str) -> None:
    run_shop(tmp_path, rabbitmq_url)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.postgres
def test_shop_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    import psycopg

    schema = f"nervus_shop_{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in postgres_url else "?"
    try:
        run_shop(tmp_path, f"{postgres_url}{separator}schema={schema}")
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as db:
            db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
