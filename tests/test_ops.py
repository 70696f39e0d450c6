"""The operations surface against real Postgres and Kafka: status, metrics, readiness, retention,
replay, the dead-letter workflow, the Postgres-health guard and logging (docs/operations.md)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from outbox_relay import Message, enqueue_many
from outbox_relay.errors import ConfigError
from outbox_relay.health import RelayState
from outbox_relay.logs import redact, setup_logging, use_json
from outbox_relay.schema import SCHEMA_REVISION
from outbox_relay.settings import conninfo, load_settings, producer_settings
from outbox_relay.store import RETENTION_KEY, Store

from .conftest import (
    Outbox,
    RelayProcess,
    consume,
    free_port,
    migrate_schema,
    run_cli,
    wait_for,
)
from .pg_cluster import APP_PASSWORD, APP_USER, PgCluster, check_binaries, make_root, pg_tool


# ---------------------------------------------------------------------- helpers
def _enqueue(
    engine: Engine,
    topic: str,
    n: int,
    *,
    keys: int = 3,
    start: int = 0,
    prefix: str = "ik",
    hold: bool = False,
    age_s: float = 0.0,
) -> None:
    """``n`` messages ``{"n": i}`` with idempotency keys ``{prefix}-{i}``. ``hold``: in backoff
    for an hour (pending, but no relay fetches them); ``age_s``: created that long ago. Both are
    set in the enqueueing transaction, so no relay sees the rows otherwise."""
    with Session(engine) as s, s.begin():
        enqueue_many(
            s,
            [
                Message(topic, {"n": i}, key=f"k{i % keys}", idempotency_key=f"{prefix}-{i}")
                for i in range(start, start + n)
            ],
        )
        if hold or age_s:
            table = f'"{producer_settings().db_schema}".outbox'
            s.execute(
                text(
                    f"UPDATE {table} SET next_attempt_at = CASE WHEN :hold"
                    " THEN now() + interval '1 hour' END,"
                    " created_at = now() - :age * interval '1 second'"
                    " WHERE topic = :topic AND sent_at IS NULL"
                ).bindparams(hold=hold, age=age_s, topic=topic)
            )


def _http(relay: RelayProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.http_port}{path}", timeout=3) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError:
        return 0, ""


def _ready(relay: RelayProcess) -> tuple[int, dict[str, Any]]:
    code, body = _http(relay, "/readyz")
    return code, (json.loads(body) if body else {})


def _metric(relay: RelayProcess, name: str, **labels: str) -> float | None:
    """One sample of ``name`` (with exactly these labels) from /metrics, or None."""
    code, body = _http(relay, "/metrics")
    if code != 200:
        return None
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def _status(outbox: Outbox, **env: str) -> dict[str, Any]:
    done = run_cli("status", "--json", env={**outbox.env, **env})
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _cli(outbox: Outbox, *args: str, code: int = 0, **env: str) -> Any:
    done = run_cli(*args, env={**outbox.env, **env})
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    return done


def _id(outbox: Outbox, key: str) -> int:
    return int(outbox.sql("SELECT id FROM {t} WHERE idempotency_key = %s", (key,))[0][0])


def _keys(outbox: Outbox, where: str) -> set[str]:
    return {r[0] for r in outbox.sql(f"SELECT idempotency_key FROM {{t}} WHERE {where}")}


# ---------------------------------------------------------------------- status
def test_status_matches_the_table_and_shows_owners_after_a_kill(
    outbox: Outbox, engine: Engine, relay_factory: Callable[..., RelayProcess]
) -> None:
    _enqueue(engine, "orders", 20, keys=5, hold=True, age_s=90, prefix="o")
    _enqueue(engine, "refunds", 6, keys=2, hold=True, prefix="r")
    outbox.sql(
        "UPDATE {t} SET dead_at = now(), attempts = 10, last_error = 'boom'"
        " WHERE idempotency_key IN ('r-0', 'r-1')"
    )
    # three delivered just now, by the relay's own statement (deleted, counted), one long ago
    store = Store(outbox.schema, "outbox", 4242)
    ids = [r[0] for r in outbox.sql(
        "SELECT id FROM {t} WHERE idempotency_key IN ('o-0', 'o-1', 'o-2', 'o-3')")]
    epochs = dict(outbox.sql(f'SELECT shard, epoch FROM "{outbox.schema}".outbox_shards'))
    with psycopg.connect(conninfo(outbox.url), autocommit=True) as conn:
        assert store.mark_sent(conn, ids[:3], epochs, keep=False) == 3
    outbox.sql("DELETE FROM {t} WHERE id = %s", (ids[3],))
    outbox.sql(
        f'INSERT INTO "{outbox.schema}".outbox_sent_stats'
        " VALUES (now() - interval '5 minutes', 1, now() - interval '5 minutes',"
        " now() - interval '5 minutes')"
    )

    st = _status(outbox)
    topics = {t["topic"]: t for t in st["topics"]}
    assert topics["orders"]["pending"] == 16 and topics["orders"]["dead"] == 0
    assert topics["refunds"]["pending"] == 4 and topics["refunds"]["dead"] == 2
    assert st["pending"] == 20 and st["dead_letters"] == 2 and st["sent_last_minute"] == 3
    assert 90 <= st["oldest_pending_s"] < 300
    assert 90 <= topics["orders"]["oldest_age_s"] < 300
    assert topics["refunds"]["oldest_age_s"] < 60
    by_shard = dict(
        outbox.sql(
            "SELECT shard, count(*) FROM {t} WHERE sent_at IS NULL AND dead_at IS NULL"
            " GROUP BY shard"
        )
    )
    assert {s["shard"]: s["pending"] for s in st["shards"]} == by_shard
    assert st["schema_ok"] and st["schema_revision"] == st["package_revision"] == SCHEMA_REVISION
    assert st["relays"] == [] and st["table"]["total_bytes"] > 0
    assert isinstance(st["table"]["dead_tuples"], int) and st["table"]["indexes"]

    a = relay_factory()
    b = relay_factory("--poll-only")

    def split() -> bool:
        relays = _status(outbox)["relays"]
        # balanced, not just all owned: a relay that took more than its share at start (both
        # started together) releases the extra ones a moment later, unowned until taken
        return len(relays) == 2 and all(r["shards"] == outbox.shards // 2 for r in relays)

    wait_for(split, 30, "two relays sharing the shards in status")
    st = _status(outbox)
    relays = {r["name"]: r for r in st["relays"]}
    assert set(relays) == {"relay-0", "relay-1"}
    assert relays["relay-0"]["listener"] == "notify" and relays["relay-1"]["listener"] == "poll"
    leases = dict(
        outbox.sql(
            "SELECT application_name, pid FROM pg_stat_activity"
            " WHERE application_name LIKE 'outbox-relay lease relay-_'"
        )
    )
    assert relays["relay-0"]["backend_pid"] == leases["outbox-relay lease relay-0"]
    assert relays["relay-0"]["client_addr"] == "127.0.0.1" and relays["relay-0"]["client_port"]
    owners = {o["shard"]: o["application_name"] for o in st["owners"]}
    assert set(owners.values()) == {"outbox-relay lease relay-0", "outbox-relay lease relay-1"}
    assert st["pending"] == 20, "held rows stay pending while relays run"

    a.kill()
    wait_for(
        lambda: (
            [(r["name"], r["shards"]) for r in _status(outbox)["relays"]]
            == [("relay-1", outbox.shards)]
        ),
        30,
        "the survivor owning every shard",
    )
    st = _status(outbox)
    assert {o["application_name"] for o in st["owners"]} == {"outbox-relay lease relay-1"}
    human = _cli(outbox, "status").stdout
    assert "relay-1" in human and "relay-0" not in human
    assert f"revision {SCHEMA_REVISION}" in human and "schema        ok" in human
    assert "refunds" in human and "dead letters 2" in human
    assert b.terminate() == 0


# ---------------------------------------------------------------------- metrics
def test_metrics_reflect_published_counts_and_pending_gauges(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    relay = relay_factory(OUTBOX_GAUGE_INTERVAL="0.2")
    _enqueue(engine, topic, 25)
    assert len(consume(kafka_bootstrap, topic, expected=25, timeout=30)) == 25
    wait_for(
        lambda: (
            _metric(relay, "outbox_messages_published_total", topic=topic, sink="kafka") == 25.0
        ),
        15,
        "published counter at 25",
    )
    assert _metric(relay, "outbox_end_to_end_lag_seconds_count") == 25.0
    assert (_metric(relay, "outbox_batch_size_count") or 0) >= 1
    assert _metric(relay, "outbox_shards_owned") == float(outbox.shards)
    build = {"version": version("outbox-relay"), "schema_revision": SCHEMA_REVISION}
    assert _metric(relay, "outbox_relay_build_info", **build) == 1.0
    assert f"outbox-relay {build['version']} connected to" in relay.output()

    _enqueue(engine, "held.topic", 7, hold=True, age_s=100, prefix="h")
    outbox.sql("UPDATE {t} SET dead_at = now() WHERE idempotency_key IN ('h-0', 'h-1')")
    wait_for(
        lambda: (
            _metric(relay, "outbox_pending", topic="held.topic") == 5.0
            and _metric(relay, "outbox_dead_letters", topic="held.topic") == 2.0
        ),
        15,
        "pending and dead-letter gauges",
    )
    assert 100 <= (_metric(relay, "outbox_oldest_pending_age_seconds") or 0) < 300
    assert _metric(relay, "outbox_pending", topic=topic) is None, "drained topics leave the gauge"
    outbox.sql("DELETE FROM {t} WHERE topic = 'held.topic'")
    wait_for(
        lambda: (
            _metric(relay, "outbox_pending", topic="held.topic") is None
            and _metric(relay, "outbox_oldest_pending_age_seconds") == 0.0
        ),
        15,
        "gauges back to empty",
    )
    assert relay.terminate() == 0


def test_maintenance_after_a_connection_waits_for_the_backlog_or_its_interval(
    outbox: Outbox, db_url: str, engine: Engine
) -> None:
    """A relay starting on a backlog publishes before it counts: the first gauges, checks and
    retention slice wait until a round finds no backlog, or until their interval is over."""
    from outbox_relay.guard import Maintenance

    _enqueue(engine, "backlog.topic", 3)
    settings = load_settings(
        database_url=db_url,
        db_schema=outbox.schema,
        gauge_interval=0.5,
        guard_interval=0.5,
        retention=3600,
    )
    state = RelayState()
    maintenance = Maintenance(settings, Store(outbox.schema, "outbox", settings.namespace), state)
    shards = list(range(outbox.shards))
    with psycopg.connect(conninfo(db_url), autocommit=True) as conn:
        maintenance.tick(conn, shards, caught_up=False)
        assert "pending" not in state.maintenance and state.warnings == []
        assert "retention" not in state.maintenance
        maintenance.tick(conn, shards, caught_up=True)  # caught up: at once
        assert state.maintenance["pending"] == 3
        assert "retention" in state.maintenance
        _enqueue(engine, "backlog.topic", 1, prefix="a")
        time.sleep(0.6)
        maintenance.tick(conn, shards, caught_up=False)  # behind: 12 intervals between counts
        assert state.maintenance["pending"] == 3
        maintenance.tick(conn, shards, caught_up=True)  # caught up: one interval
        assert state.maintenance["pending"] == 4
    _enqueue(engine, "backlog.topic", 2, prefix="b")
    with psycopg.connect(conninfo(db_url), autocommit=True) as conn:  # a new connection
        maintenance.tick(conn, shards, caught_up=False)
        assert state.maintenance["pending"] == 4, "counted again before the backlog's rounds"
        time.sleep(0.6)
        maintenance.tick(conn, shards, caught_up=False)
        assert state.maintenance["pending"] == 4, "behind: 12 intervals between counts"
        wait_for(
            lambda: (
                maintenance.tick(conn, shards, caught_up=False)
                or state.maintenance["pending"] == 6
            ),
            12,
            "a count while behind, 12 intervals (6 s) after connecting",
        )


# ---------------------------------------------------------------------- readiness
def test_readiness_fails_on_schema_behind_or_drift_and_recovers(
    outbox: Outbox, relay_factory: Callable[..., RelayProcess]
) -> None:
    relay = relay_factory(OUTBOX_GUARD_INTERVAL="0.2")
    wait_for(lambda: _ready(relay)[0] == 200, 30, "/readyz 200")
    meta = f'"{outbox.schema}".outbox_meta'

    def not_ready(needle: str) -> Callable[[], bool]:
        def check() -> bool:
            code, body = _ready(relay)
            return code == 503 and any(needle in r for r in body.get("not_ready", []))

        return check

    outbox.sql(f"UPDATE {meta} SET value = '0000' WHERE name = 'revision'")
    wait_for(not_ready("revision '0000'"), 15, "/readyz 503: schema behind")
    body = _ready(relay)[1]
    assert body["schema"] is False and "outbox-relay migrate" in body["schema_detail"]
    assert _metric(relay, "outbox_schema_ok") == 0.0
    behind = _cli(outbox, "status")
    assert "PROBLEM" in behind.stdout and "revision '0000'" in behind.stdout
    outbox.sql(f"UPDATE {meta} SET value = %s WHERE name = 'revision'", (SCHEMA_REVISION,))
    wait_for(lambda: _ready(relay)[0] == 200, 15, "/readyz 200 again")

    outbox.sql(f'DROP INDEX "{outbox.schema}".outbox_dead_idx')
    wait_for(not_ready("missing index outbox_dead_idx"), 15, "/readyz 503: index dropped")
    assert "outbox_dead_idx" in " ".join(_status(outbox)["schema_problems"])
    outbox.sql("CREATE INDEX outbox_dead_idx ON {t} (id) WHERE dead_at IS NOT NULL")
    wait_for(lambda: _ready(relay)[0] == 200, 15, "/readyz 200 after the index is back")

    outbox.sql("ALTER TABLE {t} DISABLE TRIGGER outbox_notify")
    wait_for(not_ready("disabled trigger outbox_notify"), 15, "/readyz 503: trigger disabled")
    outbox.sql("ALTER TABLE {t} ENABLE TRIGGER outbox_notify")
    wait_for(lambda: _ready(relay)[0] == 200, 15, "/readyz 200 after the trigger is back")
    assert _metric(relay, "outbox_schema_ok") == 1.0
    assert relay.alive()
    out = relay.output()
    assert "outbox schema problem" in out and "as expected again" in out
    assert relay.terminate() == 0


class TcpProxy:
    """A loopback TCP forwarder that can be stopped (every connection cut, nothing listening)
    and started again on the same port: the database "goes down" for the relay only."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._running = False

    def start(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        srv.settimeout(0.1)
        self._running = True
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        with srv:
            while self._running:
                try:
                    client, _ = srv.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                client.settimeout(None)
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    client.close()
                    continue
                with self._lock:
                    self._conns += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._running = False
        time.sleep(0.3)  # the accept loop sees the flag and closes the listening socket
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def db_proxy(outbox: Outbox) -> Iterator[TcpProxy]:
    port = psycopg.conninfo.conninfo_to_dict(conninfo(outbox.url)).get("port", 5432)
    proxy = TcpProxy(int(port))
    proxy.start()
    yield proxy
    proxy.stop()


def test_readiness_fails_while_the_database_is_unreachable_and_recovers(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    db_proxy: TcpProxy,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    pg_port = os.environ.get("OUTBOX_PG_PORT", "55432")
    url = outbox.url.replace(f":{pg_port}/", f":{db_proxy.port}/")
    assert url != outbox.url, f"the test database URL is expected on port {pg_port}"
    relay = relay_factory(OUTBOX_DATABASE_URL=url)
    wait_for(lambda: _ready(relay)[0] == 200, 30, "/readyz 200 through the proxy")
    db_proxy.stop()
    wait_for(
        lambda: (
            _ready(relay)[0] == 503
            and "database unreachable" in _ready(relay)[1].get("not_ready", [])
        ),
        30,
        "/readyz 503 while the database is unreachable",
    )
    assert _http(relay, "/healthz")[0] == 200, "the process is alive: liveness must not fail"
    time.sleep(1.0)
    assert _ready(relay)[0] == 503
    db_proxy.start()
    wait_for(lambda: _ready(relay)[0] == 200, 45, "/readyz 200 after the database is back")
    _enqueue(engine, topic, 5)
    assert len(consume(kafka_bootstrap, topic, expected=5, timeout=30)) == 5
    assert relay.alive() and "reconnect" in relay.output()


def test_relay_state_readiness_logic() -> None:
    state = RelayState(database=True, schema=True, sink=True)
    assert state.ready() and state.not_ready() == []
    state.schema, state.schema_detail = False, "missing index outbox_dead_idx"
    assert not state.ready() and state.not_ready() == ["schema: missing index outbox_dead_idx"]
    state.schema, state.database = True, False
    assert state.not_ready() == ["database unreachable"]
    state.database, state.warnings = True, [{"check": "xmin_horizon", "message": "x"}]
    assert state.ready(), "guard warnings are reported, they do not fail readiness"
    assert state.as_dict()["warnings"] == [{"check": "xmin_horizon", "message": "x"}]
    state.last_tick -= 1000
    assert not state.ready() and "drain loop stuck" in state.not_ready()


# ---------------------------------------------------------------------- retention
def _retention_fixture(outbox: Outbox, engine: Engine, prefix: str) -> dict[str, set[str]]:
    """Rows in every state, old and recent; returns idempotency keys by kind."""
    kinds = {
        "old_sent": 10,
        "recent_sent": 5,
        "old_pending": 4,
        "old_dead": 3,
        "old_discarded": 2,
    }
    out: dict[str, set[str]] = {}
    for kind, n in kinds.items():
        _enqueue(engine, f"ret.{kind}", n, hold=True, prefix=f"{prefix}-{kind}")
        out[kind] = {f"{prefix}-{kind}-{i}" for i in range(n)}
    old = "now() - interval '2 days'"
    outbox.sql(
        f"UPDATE {{t}} SET created_at = {old} - interval '1 minute' WHERE topic LIKE 'ret.old%%'"
    )
    outbox.sql(
        "UPDATE {t} SET created_at = now() - interval '2 hours' WHERE topic LIKE 'ret.recent%%'"
    )
    outbox.sql(f"UPDATE {{t}} SET sent_at = {old} WHERE topic = 'ret.old_sent'")
    outbox.sql("UPDATE {t} SET sent_at = now() - interval '1 hour' WHERE topic = 'ret.recent_sent'")
    outbox.sql(f"UPDATE {{t}} SET dead_at = {old} WHERE topic = 'ret.old_dead'")
    outbox.sql(
        f"UPDATE {{t}} SET dead_at = {old}, sent_at = {old} WHERE topic = 'ret.old_discarded'"
    )
    outbox.sql("UPDATE {t} SET topic = 'ret' WHERE topic LIKE 'ret.%%'")  # one topic for all
    return out


def test_retention_deletes_only_sent_rows_older_than_the_period(
    outbox: Outbox, engine: Engine, relay_factory: Callable[..., RelayProcess]
) -> None:
    kinds = _retention_fixture(outbox, engine, "a")
    everything = set().union(*kinds.values())
    dry = _cli(outbox, "retention", "run", "--dry-run", OUTBOX_RETENTION="1d")
    assert "would delete 10 sent row(s)" in dry.stdout
    assert _keys(outbox, "true") == everything, "a dry run deletes nothing"

    # the lock makes one run at a time: a relay's, or this command's
    with psycopg.connect(conninfo(outbox.url), autocommit=True) as holder:
        ns = load_settings(db_schema=outbox.schema).namespace
        holder.execute("SELECT pg_advisory_lock(%s, %s)", (ns, RETENTION_KEY))
        busy = _cli(outbox, "retention", "run", code=2, OUTBOX_RETENTION="1d")
        assert "another retention run holds the retention lock" in busy.stderr
        assert f"backend pid {holder.info.backend_pid}" in busy.stderr

    done = _cli(outbox, "retention", "run", "--batch-size", "3", OUTBOX_RETENTION="1d")
    assert "deleted 10 sent row(s)" in done.stdout, done.stdout
    assert _keys(outbox, "true") == everything - kinds["old_sent"]
    again = _cli(outbox, "retention", "run", OUTBOX_RETENTION="1d")
    assert "deleted 0 sent row(s)" in again.stdout

    off = _cli(outbox, "retention", "run", code=2, OUTBOX_RETENTION="0")
    assert "retention is off" in off.stderr
    bad = _cli(outbox, "retention", "run", code=2, OUTBOX_RETENTION="soon")
    assert "OUTBOX_RETENTION" in bad.stderr and "Traceback" not in bad.stderr

    # the relay runs it too, at its own pace; pending and dead rows survive it
    more = _retention_fixture(outbox, engine, "b")
    relay = relay_factory(OUTBOX_RETENTION="1d", OUTBOX_RETENTION_INTERVAL="0.3")
    wait_for(
        lambda: not _keys(outbox, "idempotency_key LIKE 'b-old_sent-%%'"),
        30,
        "the relay's retention deleting old sent rows",
    )
    left = _keys(outbox, "true")
    assert left == (everything | set().union(*more.values())) - kinds["old_sent"] - more["old_sent"]
    wait_for(
        lambda: (_metric(relay, "outbox_retention_deleted_total") or 0) >= 10,
        10,
        "retention counter",
    )
    wait_for(lambda: "retention deleted 10 sent rows" in relay.output(), 10, "retention log line")
    assert relay.terminate() == 0


# ---------------------------------------------------------------------- replay
def test_replay_republishes_exactly_the_selected_rows_with_the_same_keys(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    relay = relay_factory(OUTBOX_KEEP_SENT="true")
    _enqueue(engine, topic, 30, keys=3)
    first = consume(kafka_bootstrap, topic, expected=30, timeout=30)
    assert len(first) == 30
    wait_for(lambda: outbox.pending() == 0, 10, "all sent")
    # created_at = 2026-01-01 00:00 UTC + n minutes, so a time range selects exactly n = 10..19
    outbox.sql(
        "UPDATE {t} SET created_at = timestamptz '2026-01-01 00:00:00+00'"
        " + (split_part(idempotency_key, '-', 2))::int * interval '1 minute'"
    )
    window = ("--since", "2026-01-01T00:10:00Z", "--until", "2026-01-01T00:20:00")
    dry = _cli(outbox, "replay", "--topic", topic, *window, "--dry-run")
    assert f"would replay 10 sent message(s) of {topic}" in dry.stdout
    assert outbox.pending() == 0, "a dry run changes nothing"
    none = _cli(outbox, "replay", "--topic", "no.such.topic", *window)
    assert "replaying 0 message(s)" in none.stdout

    done = _cli(outbox, "replay", "--topic", topic, *window, "--batch-size", "4")
    assert "replaying 10 message(s)" in done.stdout and "outbox-replay=" in done.stdout
    wait_for(lambda: outbox.pending() == 0, 20, "replayed rows sent again")
    got = consume(kafka_bootstrap, topic, expected=30, timeout=30, settle=3)
    copies = [m for m in got if "outbox-replay" in m.headers]
    assert len(got) == 40 and len(copies) == 10
    assert sorted(m.headers["idempotency-key"] for m in copies) == sorted(
        f"ik-{n}" for n in range(10, 20)
    )
    original = {m.headers["idempotency-key"]: m for m in got if "outbox-replay" not in m.headers}
    assert len(original) == 30
    for m in copies:
        o = original[m.headers["idempotency-key"]]
        assert (m.key, m.partition, m.value) == (o.key, o.partition, o.value)
        assert m.headers["outbox-id"] == o.headers["outbox-id"]
    per_key: dict[str | None, list[int]] = {}
    for m in sorted(copies, key=lambda m: (m.partition, m.offset)):
        per_key.setdefault(m.key, []).append(int(m.headers["outbox-id"]))
    assert all(ids == sorted(ids) for ids in per_key.values()), "replayed in id order per key"

    ids = [_id(outbox, "ik-3"), _id(outbox, "ik-25")]
    partial = _cli(
        outbox,
        "replay",
        "--topic",
        topic,
        "--ids",
        f"{ids[0]},{ids[1]}",
        "--ids",
        "999999",
        code=1,
    )
    assert "replaying 2 message(s)" in partial.stdout
    wait_for(lambda: outbox.pending() == 0, 20, "second replay sent")
    got = consume(kafka_bootstrap, topic, expected=30, timeout=30, settle=3)
    assert len(got) == 42
    markers = {m.headers["outbox-replay"] for m in got if "outbox-replay" in m.headers}
    assert len(markers) == 2, "each replay has its own marker"
    bad = _cli(outbox, "replay", "--topic", topic, code=2)
    assert "needs either --ids or --since" in bad.stderr
    assert relay.terminate() == 0


# ---------------------------------------------------------------------- dead letters
def test_dead_letters_show_retry_discard_restore(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    _enqueue(engine, topic, 5, keys=5, hold=True)
    outbox.sql(
        "UPDATE {t} SET dead_at = now(), attempts = 10, last_error = 'boom: HTTP 500'"
        " WHERE idempotency_key <> 'ik-4'"
    )
    a, b, pending = _id(outbox, "ik-0"), _id(outbox, "ik-1"), _id(outbox, "ik-4")

    shown = _cli(outbox, "dead-letters", "show", "--id", str(a)).stdout
    assert "dead letter" in shown and "boom: HTTP 500" in shown and "ik-0" in shown
    assert '{"n":0}' not in shown and "--payload prints it" in shown
    full = json.loads(
        _cli(outbox, "dead-letters", "show", "--id", str(a), "--json", "--payload").stdout
    )
    assert full["payload"] == '{"n":0}' and full["state"] == "dead letter"
    _cli(outbox, "dead-letters", "show", "--id", "999999", code=2)

    done = _cli(outbox, "dead-letters", "discard", "--id", str(a), "--reason", "poison pill")
    assert "discarded 1 dead letter(s)" in done.stdout
    sent_at, dead_at, headers = outbox.sql(
        "SELECT sent_at, dead_at, headers FROM {t} WHERE id = %s", (a,)
    )[0]
    audit = json.loads(headers["outbox-discarded"])
    assert sent_at is not None and dead_at is not None
    assert audit["reason"] == "poison pill" and "@" in audit["by"] and audit["at"]
    listed = json.loads(_cli(outbox, "dead-letters", "list", "--json").stdout)
    assert a not in {r["id"] for r in listed} and len(listed) == 3
    discarded = json.loads(_cli(outbox, "dead-letters", "discarded", "--json").stdout)
    assert [r["id"] for r in discarded] == [a] and "poison pill" in discarded[0]["discard"]
    st = _status(outbox)
    assert st["dead_letters"] == 3 and st["discarded"] == 1 and st["sent_last_minute"] == 0

    dry = _cli(outbox, "dead-letters", "discard", "--topic", topic, "--dry-run")
    assert "would discard 3" in dry.stdout
    not_dead = _cli(outbox, "dead-letters", "discard", "--id", str(pending), code=1)
    assert f"not dead letters: {pending}" in not_dead.stderr
    _cli(outbox, "dead-letters", "discard", code=2)

    restored = _cli(outbox, "dead-letters", "restore", "--id", str(a))
    assert "restored 1" in restored.stdout
    assert len(json.loads(_cli(outbox, "dead-letters", "list", "--json").stdout)) == 4
    assert "outbox-discarded" not in outbox.sql("SELECT headers FROM {t} WHERE id = %s", (a,))[0][0]

    outbox.sql("UPDATE {t} SET next_attempt_at = NULL WHERE id = %s", (pending,))
    retried = _cli(outbox, "dead-letters", "retry", "--id", str(b))
    assert "re-queued 1" in retried.stdout
    relay = relay_factory(OUTBOX_KEEP_SENT="true")
    got = consume(kafka_bootstrap, topic, expected=2, timeout=30, settle=1)
    assert sorted(m.headers["idempotency-key"] for m in got) == ["ik-1", "ik-4"]
    wait_for(
        lambda: _keys(outbox, "sent_at IS NOT NULL") == {"ik-1", "ik-4"},
        10,
        "retried dead letter sent",
    )

    gone = _cli(outbox, "dead-letters", "discard", "--topic", topic, "--reason", "cleanup")
    assert "discarded 3 dead letter(s)" in gone.stdout
    assert json.loads(_cli(outbox, "dead-letters", "list", "--json").stdout) == []
    # retention removes the sent rows, never the discarded ones (they are the audit record)
    _cli(outbox, "retention", "run", "--older-than", "1ms")
    assert _keys(outbox, "true") == {"ik-0", "ik-2", "ik-3"}
    assert relay.terminate() == 0


# ---------------------------------------------------------------------- health guard
@pytest.fixture
def own_database(outbox: Outbox) -> Iterator[tuple[str, Engine]]:
    """The outbox (same schema name) migrated into a database of its own. The xmin horizon is
    per database, so sessions of other tests or benchmarks on the shared test database do not
    crowd the guard's report."""
    name = f"ops_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(conninfo(outbox.url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = outbox.url.rsplit("/", 1)[0] + f"/{name}"
    migrate_schema(url, outbox.schema, outbox.shards)
    engine = create_engine(url)
    try:
        yield url, engine
    finally:
        engine.dispose()
        with psycopg.connect(conninfo(outbox.url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_horizon_guard_fires_while_a_transaction_is_held_open(
    outbox: Outbox,
    relay_factory: Callable[..., RelayProcess],
    own_database: tuple[str, Engine],
) -> None:
    url, engine = own_database
    env = {"OUTBOX_DATABASE_URL": url}
    relay = relay_factory(
        OUTBOX_GUARD_INTERVAL="0.2",
        OUTBOX_GUARD_XACT_AGE="1",
        OUTBOX_GAUGE_INTERVAL="0.2",
        OUTBOX_PENDING_SLO="30",
        **env,
    )
    wait_for(lambda: _ready(relay)[0] == 200, 30, "/readyz 200")
    wait_for(
        lambda: _metric(relay, "outbox_guard_problem", check="xmin_horizon") == 0.0,
        20,
        "the guard's first check (no problem yet)",
    )
    holder = psycopg.connect(conninfo(url), autocommit=True, application_name="ops-test-holder")
    pid = holder.info.backend_pid
    try:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute(f'SELECT count(*) FROM "{outbox.schema}".outbox')

        def flagged() -> bool:
            code, body = _ready(relay)
            return code == 200 and any(
                w["check"] == "xmin_horizon" and any(h.get("pid") == pid for h in w["detail"])
                for w in body.get("warnings", [])
            )

        wait_for(flagged, 20, "/readyz warning about the held transaction (and still 200)")
        assert _metric(relay, "outbox_guard_problem", check="xmin_horizon") == 1.0
        assert (_metric(relay, "outbox_xmin_horizon_age_seconds") or 0) >= 1
        wait_for(lambda: f"pid {pid}" in relay.output(), 10, "a warning naming the holder")
        assert "ops-test-holder" in relay.output()
        st = _status(outbox, OUTBOX_GUARD_XACT_AGE="1", **env)
        (w,) = [w for w in st["warnings"] if w["check"] == "xmin_horizon"]
        assert [h["pid"] for h in w["detail"]] == [pid]
        human = _cli(outbox, "status", OUTBOX_GUARD_XACT_AGE="1", **env).stdout
        assert "WARNINGS" in human and "xmin_horizon" in human and f"pid {pid}" in human
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(
        lambda: (
            _metric(relay, "outbox_guard_problem", check="xmin_horizon") == 0.0
            and not _ready(relay)[1].get("warnings")
        ),
        20,
        "the warning to clear once the transaction ended",
    )
    wait_for(lambda: "xmin_horizon is fine again" in relay.output(), 10, "an all-clear line")

    # the pending SLO: held messages created a minute ago
    _enqueue(engine, "slo.topic", 20, hold=True, age_s=60, prefix="slo")
    wait_for(
        lambda: _metric(relay, "outbox_guard_problem", check="pending_slo") == 1.0,
        20,
        "pending SLO warning",
    )
    assert "OUTBOX_PENDING_SLO" in relay.output()
    # dead tuples over a (tiny) threshold
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        conn.execute(f'DELETE FROM "{outbox.schema}".outbox')

    def dead_tuples_warned() -> bool:
        st = _status(outbox, OUTBOX_GUARD_DEAD_TUPLES="5", **env)
        return any(w["check"] == "dead_tuples" for w in st["warnings"])

    wait_for(dead_tuples_warned, 30, "dead tuples warning in status")
    bad = _cli(outbox, "status", code=2, OUTBOX_GUARD_DEAD_TUPLES="-1", **env)
    assert "OUTBOX_GUARD_DEAD_TUPLES" in bad.stderr
    assert relay.terminate() == 0


@dataclass
class SlotClusters:
    """A throwaway primary with the outbox migrated in, and a hot standby streaming from it
    through a physical replication slot with ``hot_standby_feedback=on``."""

    primary: PgCluster
    standby: PgCluster
    slot: str
    url: str

    def slot_row(self) -> dict[str, Any]:
        with self.primary.admin() as conn:
            cur = conn.execute(
                "SELECT active, xmin::text::bigint AS xmin, age(xmin) AS age"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            )
            row = cur.fetchone()
            assert row is not None, f"slot {self.slot} is gone"
            return {"active": row[0], "xmin": row[1], "age": row[2]}


@pytest.fixture
def slot_clusters(outbox: Outbox) -> Iterator[SlotClusters]:
    """Two clusters of the test's own (the shared one's slots and horizon are not ours to touch):
    a primary and a standby made by ``pg_basebackup -R -S <slot>``; both stopped and their
    directories removed at teardown, whatever happened."""
    check_binaries()
    root = make_root()
    primary = PgCluster("primary", root)
    standby = PgCluster("standby", root)
    slot = "outbox_test_standby"
    try:
        primary.initdb()
        primary.start()
        primary.wait_ready()
        with primary.admin() as conn:
            conn.execute(f"CREATE ROLE {APP_USER} LOGIN SUPERUSER PASSWORD '{APP_PASSWORD}'")
            conn.execute(f"CREATE DATABASE outbox OWNER {APP_USER}")
            conn.execute("SELECT pg_create_physical_replication_slot(%s)", (slot,))
        url = primary.url("outbox")
        migrate_schema(url, outbox.schema, outbox.shards)
        pg_tool(
            "pg_basebackup",
            "-D",
            standby.data,
            "-h",
            primary.socket_dir,
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-X",
            "stream",
            "-S",
            slot,
            "-R",
            "--checkpoint=fast",
            "--no-sync",
        )
        standby.configure(
            hot_standby="on", hot_standby_feedback="on", wal_receiver_status_interval="'1s'"
        )
        standby.start()
        standby.wait_ready()
        clusters = SlotClusters(primary, standby, slot, url)
        wait_for(
            lambda: clusters.slot_row()["active"] and clusters.slot_row()["xmin"] is not None,
            30,
            "the standby to stream through the slot and report its xmin",
        )
        yield clusters
    finally:
        standby.stop()
        primary.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_slot_guard_fires_while_a_standby_holds_the_slot_xmin_and_clears_when_dropped(
    outbox: Outbox,
    relay_factory: Callable[..., RelayProcess],
    slot_clusters: SlotClusters,
) -> None:
    c = slot_clusters
    max_age = 200
    env = {"OUTBOX_DATABASE_URL": c.url, "OUTBOX_GUARD_SLOT_XMIN_AGE": str(max_age)}
    relay = relay_factory(OUTBOX_GUARD_INTERVAL="0.2", OUTBOX_GAUGE_INTERVAL="0.2", **env)
    wait_for(lambda: _ready(relay)[0] == 200, 30, "/readyz 200")
    # the slot reports an xmin from the start, but a young one: not a problem
    wait_for(
        lambda: _metric(relay, "outbox_guard_problem", check="replication_slot") == 0.0,
        20,
        "the guard's first check (no problem yet)",
    )
    assert c.slot_row()["age"] < max_age
    writer = c.primary.admin("outbox")
    writer.execute("CREATE TABLE churn (n int)")

    def write(n: int) -> None:  # one transaction id each: the primary's xmin moves on
        for i in range(n):
            writer.execute("INSERT INTO churn VALUES (%s)", (i,))

    reader = c.standby.admin("outbox", application_name="ops-test-standby-reader")
    try:
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        reader.execute(f'SELECT count(*) FROM "{outbox.schema}".outbox')
        row = reader.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        assert row is not None
        held = int(row[0]) % 2**32

        def flagged() -> bool:
            write(25)
            return _metric(relay, "outbox_guard_problem", check="replication_slot") == 1.0

        wait_for(flagged, 30, "outbox_guard_problem{check=replication_slot} == 1", every=0.2)
        slot = c.slot_row()
        assert slot["active"] and slot["xmin"] <= held, (slot, held)
        assert slot["age"] > max_age
        # a standby's snapshot is not a transaction in this database: only the slot check fires
        assert _metric(relay, "outbox_guard_problem", check="xmin_horizon") == 0.0
        _, body = _ready(relay)
        assert [w["check"] for w in body["warnings"]] == ["replication_slot"]
        wait_for(
            lambda: f"replication slot '{c.slot}' (active)" in relay.output(),
            10,
            "a warning naming the slot",
        )

        st = _status(outbox, **env)
        (w,) = [w for w in st["warnings"] if w["check"] == "replication_slot"]
        (d,) = w["detail"]
        assert d["slot_name"] == c.slot and d["slot_type"] == "physical" and d["active"] is True
        assert d["xmin_age"] > max_age and d["database"] is None
        assert f"'{c.slot}' (active) holds the xmin horizon" in w["message"]
        human = _cli(outbox, "status", **env).stdout
        assert "WARNINGS" in human
        assert f"replication_slot: replication slot '{c.slot}' (active)" in human
    finally:
        reader.execute("ROLLBACK")
        reader.close()

    # the standby goes away: the slot keeps its xmin, now inactive (a problem at any age)
    c.standby.stop(mode="fast")
    wait_for(lambda: not c.slot_row()["active"], 20, "the slot to become inactive")
    write(10)
    st = _status(outbox, **env)
    (w,) = [w for w in st["warnings"] if w["check"] == "replication_slot"]
    assert f"'{c.slot}' (INACTIVE)" in w["message"] and w["detail"][0]["active"] is False
    assert w["detail"][0]["active_pid"] is None

    writer.execute("SELECT pg_drop_replication_slot(%s)", (c.slot,))
    write(10)
    wait_for(
        lambda: (
            _metric(relay, "outbox_guard_problem", check="replication_slot") == 0.0
            and not _ready(relay)[1].get("warnings")
        ),
        20,
        "the warning to clear once the slot is dropped",
    )
    wait_for(lambda: "replication_slot is fine again" in relay.output(), 10, "an all-clear line")
    assert not _status(outbox, **env)["warnings"]
    assert "WARNINGS" not in _cli(outbox, "status", **env).stdout
    writer.close()
    assert relay.terminate() == 0


# ---------------------------------------------------------------------- logging
def test_logs_are_structured_and_never_carry_payloads_or_passwords(
    outbox: Outbox,
    topic: str,
    engine: Engine,
    kafka_bootstrap: str,
    relay_factory: Callable[..., RelayProcess],
) -> None:
    marker = "payload-marker-7f3a"
    relay = relay_factory(OUTBOX_LOG_LEVEL="DEBUG")
    with Session(engine) as s, s.begin():
        enqueue_many(s, [Message(topic, {"secret": marker, "n": i}, key="k") for i in range(3)])
    consume(kafka_bootstrap, topic, expected=3, timeout=30)
    wait_for(lambda: '"msg": "batch of' in relay.output(), 10, "a debug batch line")
    assert relay.terminate() == 0
    lines = [json.loads(line) for line in relay.output().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    batch = next(line for line in lines if line["msg"].startswith("batch of 3 rows"))
    assert batch["level"] == "debug" and batch["rows"] == 3 and batch["delivered"] == 3
    assert batch["first_id"] <= batch["last_id"] and isinstance(batch["shards"], list)
    text_out = relay.output()
    assert marker not in text_out, "payloads are never logged"
    assert "outbox:outbox@" not in text_out and "outbox:***@" in text_out

    readable = relay_factory(OUTBOX_LOG_FORMAT="text")
    wait_for(lambda: "took shards" in readable.output(), 20, "relay up")
    assert readable.terminate() == 0
    first = readable.output().splitlines()[0]
    assert not first.startswith("{") and " INFO outbox_relay" in first


def test_log_format_auto_and_redaction() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert use_json("auto", io.StringIO()) and not use_json("auto", Tty())
    assert use_json("json", Tty()) and not use_json("text", io.StringIO())
    stream = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    setup_logging("INFO", "json", stream)
    try:
        logging.getLogger("outbox_relay.test").info(
            "connect postgresql://u:hunter2@db/x with whsec_c2VjcmV0", extra={"shard": 3}
        )
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    line = json.loads(stream.getvalue())
    assert line["shard"] == 3 and "hunter2" not in line["msg"] and "c2VjcmV0" not in line["msg"]
    assert redact("password=abc host=db") == "password=*** host=db"


def test_duration_settings() -> None:
    assert load_settings(retention="7d").retention == 7 * 86400
    assert load_settings(retention="90").retention == 90
    assert load_settings(pending_slo="15m", guard_xact_age="250ms").pending_slo == 900
    assert load_settings(retention="0").retention == 0
    with pytest.raises(ConfigError, match="OUTBOX_RETENTION"):
        load_settings(retention="soon")


def test_version_names_the_package_and_the_schema_revision_it_expects() -> None:
    done = run_cli("--version", env={})
    assert done.returncode == 0, done.stderr
    expected = f"outbox-relay {version('outbox-relay')} (schema revision {SCHEMA_REVISION})"
    assert done.stdout.strip() == expected
