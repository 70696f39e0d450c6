"""Shared fixtures. Tests run against the real services started by ``make services``.

A test that needs a service and cannot reach it FAILS (never skips): run ``make services`` and
source ``.dev/env`` (``make test`` does both).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import Engine, create_engine

from outbox_relay.settings import conninfo, producer_settings

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "outbox-relay"


def _env(name: str, fallback: str | None = None) -> str:
    value = os.environ.get(name) or (os.environ.get(fallback) if fallback else None)
    if not value:
        pytest.fail(f"{name} is not set: run `make services` and `. .dev/env` (or `make test`)")
    return value


@pytest.fixture(scope="session")
def db_url() -> str:
    url = _env("OUTBOX_TEST_DATABASE_URL", "OUTBOX_DATABASE_URL")
    try:
        with psycopg.connect(conninfo(url), connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres at {url} is unreachable ({exc}): run `make services`")
    return url


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    servers = _env("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
    try:
        AdminClient({"bootstrap.servers": servers}).list_topics(timeout=15)
    except KafkaException as exc:
        pytest.fail(f"Kafka at {servers} is unreachable ({exc}): run `make services`")
    return servers


@pytest.fixture(scope="session")
def engine(db_url: str) -> Iterator[Engine]:
    eng = create_engine(db_url, pool_size=10, max_overflow=10)
    yield eng
    eng.dispose()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run the installed ``outbox-relay`` console script; returns CompletedProcess."""
    return subprocess.run(
        [str(BIN), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Outbox:
    """A freshly migrated outbox in its own schema."""

    url: str
    schema: str
    shards: int
    table: str = "outbox"
    env: dict[str, str] = field(default_factory=dict)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(conninfo(self.url), autocommit=True) as conn:
            cur = conn.execute(query.replace("{t}", f'"{self.schema}"."{self.table}"'), params)
            return cur.fetchall() if cur.description else []

    def pending(self) -> int:
        return int(self.sql("SELECT count(*) FROM {t} WHERE sent_at IS NULL")[0][0])


def migrate_schema(url: str, schema: str, shards: int, table: str = "outbox") -> dict[str, str]:
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": url,
        "OUTBOX_SCHEMA": schema,
        "OUTBOX_TABLE": table,
        "OUTBOX_SHARDS": str(shards),
    }
    done = run_cli("migrate", env=env)
    assert done.returncode == 0, done.stderr
    return env


@pytest.fixture
def outbox(
    db_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Outbox]:
    """A migrated outbox in a unique schema; the producer helper is pointed at it."""
    marker = request.node.get_closest_marker("shards")
    shards = int(marker.args[0]) if marker else 8
    schema = f"t_{uuid.uuid4().hex[:10]}"
    env = migrate_schema(db_url, schema, shards)
    monkeypatch.setenv("OUTBOX_SCHEMA", schema)
    producer_settings.cache_clear()
    yield Outbox(db_url, schema, shards, env=env)
    producer_settings.cache_clear()
    with psycopg.connect(conninfo(db_url), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def topic(kafka_bootstrap: str) -> Iterator[str]:
    """A fresh Kafka topic with 4 partitions."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.create_topics(
        [NewTopic(name, num_partitions=4, replication_factor=1)]
    ).values():
        fut.result(timeout=30)
    yield name
    admin.delete_topics([name], operation_timeout=10)


@dataclass
class Received:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, str]


def received(msg: Any) -> Received:
    """A consumed Kafka message as the tests compare it (headers decoded, missing ones "")."""
    headers = {k: (v.decode() if v is not None else "") for k, v in msg.headers() or []}
    key = msg.key()
    return Received(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        key.decode() if key is not None else None,
        msg.value(),
        headers,
    )


def consume(
    bootstrap: str, topic: str, expected: int, timeout: float = 60.0, settle: float = 0.0
) -> list[Received]:
    """Read ``topic`` from the beginning until ``expected`` distinct messages (by idempotency key)
    arrived, then ``settle`` s more to catch extras, or until ``timeout``; returns every copy
    that arrived, in per-partition order."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    got: list[Received] = []
    unique: set[str] = set()
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            if settle_until is None and len(unique) >= expected:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            got.append(received(msg))
            unique.add(got[-1].headers.get("idempotency-key", ""))
    finally:
        consumer.close()
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProcess:
    """``outbox-relay run`` as a real subprocess, logging to a file."""

    def __init__(self, env: dict[str, str], log: Path, args: tuple[str, ...] = ()) -> None:
        self.log = log
        self.http_port = free_port()
        env = {**env, "OUTBOX_HTTP_PORT": str(self.http_port), "OUTBOX_HTTP_HOST": "127.0.0.1"}
        self._fh = log.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN), "run", *args],
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 40) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def relay_factory(
    outbox: Outbox, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[Callable[..., RelayProcess]]:
    """Start relays against ``outbox``; every one is stopped at teardown."""
    started: list[RelayProcess] = []

    def start(*args: str, **env: str) -> RelayProcess:
        full = {
            **outbox.env,
            "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "OUTBOX_POLL_INTERVAL": "1",
            "OUTBOX_REBALANCE_INTERVAL": "0.5",
            "OUTBOX_RELAY_NAME": f"relay-{len(started)}",
            **env,
        }
        relay = RelayProcess(full, tmp_path / f"relay-{len(started)}.log", args)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.kill()
        # captured output: pytest shows it only when the test failed
        tail = relay.output().splitlines()[-80:]
        print(f"--- last {len(tail)} lines of {relay.log.name} ---", *tail, sep="\n")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "shards(n): shard count of the `outbox` fixture")
