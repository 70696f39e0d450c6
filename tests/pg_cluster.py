"""Throwaway PostgreSQL clusters for tests that need a cluster of their own (replication slots,
standbys): initdb'ed into a temporary directory from the same PostgreSQL 15 binaries that
``scripts/services.sh`` uses, on free loopback ports, always stopped and removed afterwards.

As root the server runs as the ``postgres`` OS user (PostgreSQL refuses to run as root), like
``scripts/services.sh`` does. Anything missing is a test failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from .conftest import free_port

PG_BIN = Path(os.environ.get("OUTBOX_PG_BIN") or "/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"
APP_USER = "outbox"
APP_PASSWORD = "outbox-throwaway"


def _as_root() -> bool:
    return os.geteuid() == 0


def _cmd(*args: str | Path) -> list[str]:
    argv = [str(a) for a in args]
    return ["runuser", "-u", SUPERUSER, "--", *argv] if _as_root() else argv


def pg_tool(name: str, *args: str | Path, timeout: float = 60) -> str:
    """Run one of the PostgreSQL binaries (as the server's OS user); fails the test on error."""
    argv = (PG_BIN / name, *args)
    done = subprocess.run(
        _cmd(*argv), capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
    )
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, argv))} failed ({done.returncode}): {done.stderr or done.stdout}"
        )
    return done.stdout


class PgCluster:
    """One cluster: ``data`` directory, TCP ``port`` on 127.0.0.1, unix socket in ``socket_dir``.

    Local (unix socket) connections, replication included, are trusted; TCP needs the
    application user's password.
    """

    def __init__(self, name: str, root: Path, port: int | None = None) -> None:
        self.name = name
        self.data = root / name
        self.socket_dir = root / "run"
        self.log = root / f"{name}.log"
        self.port = port or free_port()
        self.started = False

    # -- lifecycle
    def initdb(self) -> None:
        pg_tool(
            "initdb",
            "-D",
            self.data,
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        )
        self._write(
            "pg_hba.conf",
            "local all all trust\n"
            "local replication all trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n",
        )
        with (self.data / "postgresql.conf").open("a") as f:
            f.write("\ninclude_if_exists = 'throwaway.conf'\n")
        self.configure()

    def configure(self, **extra: str) -> None:
        """(Re)write this cluster's own settings file; takes effect at the next start."""
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "40",
            "shared_buffers": "32MB",
            "fsync": "off",
            "wal_level": "replica",
            "max_wal_senders": "4",
            "max_replication_slots": "4",
            "password_encryption": "scram-sha-256",
            **extra,
        }
        self._write("throwaway.conf", "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def _write(self, name: str, text: str) -> None:
        path = self.data / name
        path.write_text(text)
        if _as_root():
            shutil.chown(path, SUPERUSER, SUPERUSER)

    def start(self) -> None:
        self.started = True
        pg_tool("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start")

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (never fails: teardown must go on)."""
        if self.started or (self.data / "postmaster.pid").exists():
            subprocess.run(
                _cmd(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop"),
                capture_output=True,
                timeout=60,
                check=False,
                cwd="/",
            )
            self.started = False

    # -- connections
    def admin(
        self, dbname: str = "postgres", application_name: str = "outbox-tests"
    ) -> psycopg.Connection[Any]:
        """A superuser connection over the unix socket, autocommit."""
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
            connect_timeout=10,
            application_name=application_name,
        )

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{self.port}/{dbname}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.admin() as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} not ready after {timeout}s: {exc}\n{self.tail()}")
                time.sleep(0.2)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def make_root() -> Path:
    """A temporary directory the server's OS user owns."""
    root = Path(tempfile.mkdtemp(prefix="outbox-pg-"))
    (root / "run").mkdir()
    if _as_root():
        for path in (root, root / "run"):
            shutil.chown(path, SUPERUSER, SUPERUSER)
    return root


def check_binaries() -> None:
    for tool in ("initdb", "pg_ctl", "pg_basebackup", "postgres"):
        if not (PG_BIN / tool).exists():
            pytest.fail(
                f"{PG_BIN / tool} is missing: install PostgreSQL 15 (`make services` does) "
                "or set OUTBOX_PG_BIN"
            )
    if _as_root() and shutil.which("runuser") is None:
        pytest.fail("running as root needs `runuser` to start PostgreSQL as the postgres user")
