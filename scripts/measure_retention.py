"""Measure retention: batched DELETE (what outbox-relay ships) vs dropping partitions.

    . .dev/env && .venv/bin/python scripts/measure_retention.py --rows 2000000 \
        --out docs/retention-measurement.json

A: the real outbox (``outbox-relay migrate``), ``rows`` sent rows with ``created_at`` spread over
72 h. Three retention runs with cutoffs 60 h / 48 h / 36 h (a sixth of the table each) and batch
sizes 1000 / 5000 / 20000, a VACUUM after each. B: the same rows in a table range-partitioned by
``created_at`` per hour; retention = DETACH PARTITION CONCURRENTLY + DROP for the partitions older
than 36 h. During every run a writer thread inserts one row per transaction, and its latency is
compared with a quiet period before. Results are printed as JSON (and written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from outbox_relay.retention import Retention
from outbox_relay.settings import conninfo
from outbox_relay.store import Store

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = 512
HOURS = 72


def sql(conn: psycopg.Connection[Any], query: str, params: Any = None) -> list[tuple[Any, ...]]:
    cur = conn.execute(query, params)
    return cur.fetchall() if cur.description else []


def lsn(conn: psycopg.Connection[Any]) -> int:
    return int(sql(conn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])


def size(conn: psycopg.Connection[Any], rel: str) -> int:
    return int(
        sql(
            conn,
            "SELECT coalesce((SELECT sum(pg_total_relation_size(relid))"
            " FROM pg_partition_tree(%s::regclass)), pg_total_relation_size(%s::regclass))",
            (rel, rel),
        )[0][0]
    )


def drop_schema(url: str, schema: str) -> None:
    """Drop a run's schema, also after a failure: a 10M-row table is ~10 GiB of disk."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        sql(conn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        print(f"dropped schema {schema}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def _tuples_line(notices: list[str]) -> str:
    for n in notices:
        for line in n.splitlines():
            if line.strip().startswith("tuples:"):
                return line.strip()
    return ""


class Writer(threading.Thread):
    """One row per transaction, as fast as it goes; latencies in ms by phase."""

    def __init__(self, url: str, insert: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(conninfo(url), application_name="measure-writer")
        self.insert = insert
        self.phase = "quiet"
        self.lat: dict[str, list[float]] = {}
        self.stop = False

    def run(self) -> None:
        payload = os.urandom(PAYLOAD)
        while not self.stop:
            t = time.perf_counter()
            with self.conn.transaction():
                self.conn.execute(self.insert, (str(uuid.uuid4()), payload))
            self.lat.setdefault(self.phase, []).append((time.perf_counter() - t) * 1000)

    def summary(self, phase: str, seconds: float) -> dict[str, float]:
        v = self.lat.get(phase, [])
        return {
            "txn_per_s": round(len(v) / seconds, 1) if seconds else 0.0,
            "p50_ms": round(pct(v, 50), 2),
            "p99_ms": round(pct(v, 99), 2),
            "max_ms": round(max(v, default=0.0), 1),
        }


def quiet(writer: Writer, seconds: float) -> dict[str, float]:
    writer.phase = f"quiet-{time.monotonic()}"
    time.sleep(seconds)
    return writer.summary(writer.phase, seconds)


def load(conn: psycopg.Connection[Any], table: str, rows: int, extra_cols: str = "") -> float:
    """``rows`` sent rows, created over HOURS hours ending an hour ago, in id order."""
    t = time.monotonic()
    step = 200_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        sql(
            conn,
            f"INSERT INTO {table} (idempotency_key, topic, key, payload, content_type,"
            " created_at, sent_at)"
            " SELECT gen_random_uuid()::text, 'bench', 'k' || (g %% 1000),"
            " convert_to(repeat(md5(g::text), %(rep)s), 'UTF8'), 'application/octet-stream',"
            " c, c + interval '1 second'"
            " FROM generate_series(%(a)s::bigint, %(b)s::bigint) g,"
            " LATERAL (SELECT now() - interval '1 hour' - (%(total)s - g)"
            "   * (%(hours)s * 3600.0 / %(total)s) * interval '1 second') AS t(c)",
            {"rep": PAYLOAD // 32, "a": start, "b": start + n - 1, "total": rows, "hours": HOURS},
        )
    sql(conn, f"VACUUM (ANALYZE) {table}")
    return time.monotonic() - t


def measure_delete(url: str, rows: int) -> dict[str, Any]:
    schema = f"ret_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OUTBOX_DATABASE_URL": url, "OUTBOX_SCHEMA": schema}
    table = f'"{schema}".outbox'
    out: dict[str, Any] = {"schema": schema}
    try:
        subprocess.run([str(REPO / ".venv/bin/outbox-relay"), "migrate"], env=env, check=True)
        _measure_delete(url, rows, schema, table, out)
    finally:
        drop_schema(url, schema)
    return out


def _measure_delete(url: str, rows: int, schema: str, table: str, out: dict[str, Any]) -> None:
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        out["load_s"] = round(load(conn, table, rows), 1)
        # a few pending rows and dead letters among the old ones: never deleted
        sql(conn, f"UPDATE {table} SET sent_at = NULL WHERE id % 100000 = 7")
        sql(conn, f"UPDATE {table} SET sent_at = NULL, dead_at = now() WHERE id % 100000 = 9")
        out["size_before_bytes"] = size(conn, table)
        store = Store(schema, "outbox", 12345)
        writer = Writer(
            url,
            f"INSERT INTO {table} (idempotency_key, topic, key, payload)"
            " VALUES (%s, 'live', 'w', %s)",
        )
        writer.start()
        out["writer_quiet"] = quiet(writer, 5)
        runs = []
        for hours, batch in ((60, 1000), (48, 5000), (36, 20000)):
            retention = Retention(store, hours * 3600, batch)
            before_wal = lsn(conn)
            writer.phase = f"delete-{batch}"
            started = time.monotonic()
            times: list[float] = []
            run = retention.begin(conn)
            while not run.done:
                t = time.perf_counter()
                retention.step(conn, run)
                times.append((time.perf_counter() - t) * 1000)
            took = time.monotonic() - started
            wal = lsn(conn) - before_wal
            writer.phase = f"vacuum-{batch}"
            horizon = sql(
                conn,
                "SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8"
                " FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND backend_xmin IS NOT NULL"
                " AND application_name <> 'measure-writer'",
            )[0][0]
            notices: list[str] = []

            def on_notice(d: Any, notices: list[str] = notices) -> None:
                notices.append(str(d.message_primary))

            conn.add_notice_handler(on_notice)
            t = time.monotonic()
            sql(conn, f"VACUUM (VERBOSE) {table}")
            vacuum_s = time.monotonic() - t
            conn.remove_notice_handler(on_notice)
            runs.append(
                {
                    "cutoff_hours": hours,
                    "batch": batch,
                    "deleted": run.deleted,
                    "scanned": run.scanned,
                    "statements": run.batches,
                    "seconds": round(took, 2),
                    "rows_per_s": round(run.deleted / took) if took else None,
                    "statement_ms_p50": round(pct(times, 50), 1),
                    "statement_ms_p99": round(pct(times, 99), 1),
                    "statement_ms_max": round(max(times), 1),
                    "wal_bytes_per_row": round(wal / max(1, run.deleted), 1),
                    "vacuum_after_s": round(vacuum_s, 2),
                    "vacuum_report": _tuples_line(notices),
                    "other_xmin_holder_age_s": round(float(horizon), 1),
                    "writer_during": writer.summary(f"delete-{batch}", took),
                    "size_after_vacuum_bytes": size(conn, table),
                }
            )
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        writer.stop = True
        writer.join()
        out["runs"] = runs
        # refill as many rows as were deleted: vacuumed space is reused, the table stays flat
        deleted = sum(r["deleted"] for r in runs)
        before = size(conn, table)
        sql(
            conn,
            f"INSERT INTO {table} (idempotency_key, topic, key, payload, sent_at)"
            " SELECT gen_random_uuid()::text, 'refill', 'k', convert_to(repeat(md5(g::text),"
            " %(rep)s), 'UTF8'), now() FROM generate_series(1, %(n)s::bigint) g",
            {"rep": PAYLOAD // 32, "n": deleted},
        )
        out["refill"] = {
            "rows": deleted,
            "size_before_bytes": before,
            "size_after_bytes": size(conn, table),
        }
        left = sql(
            conn,
            f"SELECT count(*) FILTER (WHERE sent_at IS NULL AND dead_at IS NULL),"
            f" count(*) FILTER (WHERE dead_at IS NOT NULL) FROM {table}"
            f" WHERE created_at < now() - interval '36 hours'",
        )[0]
        out["old_pending_kept"], out["old_dead_kept"] = int(left[0]), int(left[1])


def measure_partitions(url: str, rows: int) -> dict[str, Any]:
    schema = f"retp_{uuid.uuid4().hex[:8]}"
    table = f'"{schema}".outbox'
    out: dict[str, Any] = {"schema": schema}
    try:
        _measure_partitions(url, rows, schema, table, out)
    finally:
        drop_schema(url, schema)
    return out


def _measure_partitions(url: str, rows: int, schema: str, table: str, out: dict[str, Any]) -> None:
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        sql(conn, f'CREATE SCHEMA "{schema}"')
        # the outbox's columns; a unique key must include the partition key, so the global
        # UNIQUE (idempotency_key) that makes enqueue idempotent is impossible here
        sql(
            conn,
            f"CREATE TABLE {table} (id bigint GENERATED BY DEFAULT AS IDENTITY,"
            " idempotency_key text NOT NULL, topic text NOT NULL, key text,"
            " payload bytea NOT NULL, content_type text NOT NULL DEFAULT 'x',"
            " headers jsonb NOT NULL DEFAULT '{}', shard smallint NOT NULL DEFAULT 0,"
            " created_at timestamptz NOT NULL DEFAULT now(), attempts int NOT NULL DEFAULT 0,"
            " next_attempt_at timestamptz, last_error text, sent_at timestamptz,"
            " dead_at timestamptz, PRIMARY KEY (id, created_at),"
            " UNIQUE (idempotency_key, created_at)) PARTITION BY RANGE (created_at)",
        )
        sql(
            conn,
            f"CREATE INDEX ON {table} (shard, id) WHERE sent_at IS NULL AND dead_at IS NULL",
        )
        hour0 = sql(conn, "SELECT date_trunc('hour', now())")[0][0]
        for h in range(-HOURS - 2, 2):
            lo, hi = sql(
                conn,
                "SELECT (%s::timestamptz + %s * interval '1 hour')::text,"
                " (%s::timestamptz + %s * interval '1 hour')::text",
                (hour0, h, hour0, h + 1),
            )[0]
            sql(
                conn,
                f'CREATE TABLE "{schema}".p{h + HOURS + 2:03d} PARTITION OF {table}'
                f" FOR VALUES FROM ('{lo}') TO ('{hi}') WITH (fillfactor = 70)",
            )
        out["partitions"] = HOURS + 4
        out["load_s"] = round(load(conn, table, rows), 1)
        out["size_before_bytes"] = size(conn, table)
        writer = Writer(
            url,
            f"INSERT INTO {table} (idempotency_key, topic, key, payload)"
            " VALUES (%s, 'live', 'w', %s)",
        )
        writer.start()
        out["writer_quiet"] = quiet(writer, 5)
        # which partitions hold only rows older than 36 h: by their upper bound
        bounds = sql(
            conn,
            "SELECT c.relname, (regexp_match(pg_get_expr(c.relpartbound, c.oid),"
            " 'TO \\(''([^'']+)''\\)'))[1]::timestamptz < now() - interval '36 hours'"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass",
            (table,),
        )
        victims = sorted(name for name, is_old in bounds if is_old)
        counted = sum(
            int(sql(conn, f'SELECT count(*) FROM "{schema}"."{name}"')[0][0]) for name in victims
        )
        before_wal = lsn(conn)
        writer.phase = "drop"
        times = []
        started = time.monotonic()
        for name in victims:
            t = time.perf_counter()
            sql(conn, f'ALTER TABLE {table} DETACH PARTITION "{schema}"."{name}" CONCURRENTLY')
            sql(conn, f'DROP TABLE "{schema}"."{name}"')
            times.append((time.perf_counter() - t) * 1000)
        took = time.monotonic() - started
        wal = lsn(conn) - before_wal
        writer.stop = True
        writer.join()
        out["drop"] = {
            "partitions_dropped": len(victims),
            "rows_removed": int(counted),
            "seconds": round(took, 2),
            "rows_per_s": round(int(counted) / took) if took else None,
            "per_partition_ms_p50": round(pct(times, 50), 1),
            "per_partition_ms_max": round(max(times), 1),
            "wal_bytes_total": wal,
            "writer_during": writer.summary("drop", took),
            "size_after_bytes": size(conn, table),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--out")
    ap.add_argument("--only", choices=["delete", "partitions"])
    ap.add_argument(
        "--database-url",
        help="a database of its own: other sessions in the same database hold back vacuum",
    )
    args = ap.parse_args()
    url = (
        args.database_url
        or os.environ.get("OUTBOX_TEST_DATABASE_URL")
        or os.environ["OUTBOX_DATABASE_URL"]
    )
    with psycopg.connect(conninfo(url)) as conn:
        version = sql(conn, "SHOW server_version")[0][0]
        settings = dict(
            sql(
                conn,
                "SELECT name, setting FROM pg_settings WHERE name IN ('shared_buffers',"
                " 'max_wal_size', 'synchronous_commit', 'wal_compression', 'checkpoint_timeout')",
            )
        )
    result: dict[str, Any] = {
        "rows": args.rows,
        "payload_bytes": PAYLOAD,
        "postgres": version,
        "settings": settings,
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.only in (None, "delete"):
        result["delete_batches"] = measure_delete(url, args.rows)
    if args.only in (None, "partitions"):
        result["partitions"] = measure_partitions(url, args.rows)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
