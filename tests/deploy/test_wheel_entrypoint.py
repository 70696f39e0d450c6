"""The image's contract without a Docker engine: build the wheel, install it into a fresh venv the
way the Dockerfile does, and run the entrypoint's commands against the real local services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest

from outbox_relay.settings import conninfo

from ..conftest import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_in_fresh_venv_migrates_runs_and_drains_on_sigterm(
    tmp_path: Path, db_url: str, kafka_bootstrap: str
) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        check=True,
        timeout=300,
    )
    wheels = list(dist.glob("outbox_relay-*.whl"))
    assert len(wheels) == 1
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheels[0])], check=True, timeout=600
    )
    exe = venv / "bin" / "outbox-relay"
    schema = f"img_{uuid.uuid4().hex[:8]}"
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "OUTBOX_DATABASE_URL": db_url,
        "OUTBOX_SCHEMA": schema,
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "PYTHONUNBUFFERED": "1",
        "HOME": str(tmp_path),
    }
    try:
        # the migrations are inside the wheel, not read from the source tree
        migrated = subprocess.run(
            [str(exe), "migrate"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert migrated.returncode == 0, migrated.stderr
        port = free_port()
        relay = subprocess.Popen(
            [str(exe), "run"],
            env={**env, "OUTBOX_HTTP_PORT": str(port)},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    return r.status == 200 and json.load(r)["ready"] is True
            except OSError:
                return False

        try:
            wait_for(ready, 60, "/readyz of the installed relay")
        finally:
            relay.send_signal(signal.SIGTERM)
            started = time.monotonic()
            out, _ = relay.communicate(timeout=45)
        assert relay.returncode == 0, out.decode(errors="replace")
        assert time.monotonic() - started < 30
    finally:
        with psycopg.connect(conninfo(db_url), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    assert os.path.isdir(venv)
