"""``outbox-relay`` command line: migrate, run, status, dead-letters, retention, replay.

Every expected failure prints one line ``outbox-relay: error: ...`` and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from . import __version__
from .errors import ConfigError, DatabaseUnavailable, OutboxError
from .schema_version import SCHEMA_REVISION
from .settings import Settings, conninfo, load_settings, redact

log = logging.getLogger("outbox_relay")


def _kv(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected PROPERTY=VALUE, got {text!r}")
    return name, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="outbox-relay",
        description="Transactional outbox for PostgreSQL: migrate the schema, relay rows to "
        "Kafka or webhooks. Settings come from OUTBOX_* environment variables; flags override.",
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__} (schema revision {SCHEMA_REVISION})",
    )
    p.add_argument("--database-url", help="OUTBOX_DATABASE_URL")
    p.add_argument("--schema", dest="db_schema", help="OUTBOX_SCHEMA (default public)")
    p.add_argument("--table", help="OUTBOX_TABLE (default outbox)")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="upgrade the outbox schema to head (or print its SQL)")
    m.add_argument("--sql", action="store_true", help="print the DDL instead (no database)")
    m.add_argument("--shards", type=int, help="OUTBOX_SHARDS, fixed when the table is created")
    m.add_argument("--downgrade", metavar="REV", help="downgrade to REV (e.g. base)")
    m.add_argument(
        "--inbox",
        action="store_true",
        help="the consumer inbox tables (outbox_relay.inbox) instead of the outbox; "
        "OUTBOX_INBOX_SCHEMA (default --schema/OUTBOX_SCHEMA), OUTBOX_INBOX_TABLE (default inbox)",
    )

    r = sub.add_parser("run", help="run the relay until SIGTERM/SIGINT")
    r.add_argument("--sink", choices=["kafka", "webhook"])
    r.add_argument("--bootstrap-servers", dest="kafka_bootstrap_servers")
    r.add_argument(
        "-X",
        dest="kafka_props",
        action="append",
        type=_kv,
        default=[],
        metavar="PROP=VALUE",
        help="librdkafka property (repeatable)",
    )
    r.add_argument("--poll-only", action="store_true", help="OUTBOX_WAKEUP=poll: no LISTEN")
    r.add_argument("--batch-size", type=int)
    r.add_argument("--poll-interval", type=float)
    r.add_argument("--http-port", type=int, help="probes and metrics; 0 disables")
    r.add_argument("--name", dest="relay_name", help="relay name shown in status")

    st = sub.add_parser("status", help="pending rows, dead letters, shard owners")
    st.add_argument("--json", action="store_true")

    d = sub.add_parser("dead-letters", help="list or re-queue dead letters")
    dsub = d.add_subparsers(dest="action", required=True)
    dl = dsub.add_parser("list")
    dl.add_argument("--topic")
    dl.add_argument("--limit", type=int, default=100)
    dl.add_argument("--json", action="store_true")
    dr = dsub.add_parser("retry")
    dr.add_argument("--id", dest="ids", type=int, action="append")
    dr.add_argument("--topic")
    dr.add_argument("--all", action="store_true", help="retry every dead letter")
    # -- operations (docs/operations.md)
    ds = dsub.add_parser("show", help="one outbox row in full (payload only with --payload)")
    ds.add_argument("--id", dest="row_id", type=int, required=True)
    ds.add_argument("--payload", action="store_true", help="include the payload")
    ds.add_argument("--json", action="store_true")
    dd = dsub.add_parser(
        "discard", help="give up on dead letters; each row stays as its own audit record"
    )
    dd.add_argument("--id", dest="ids", type=int, action="append")
    dd.add_argument("--topic")
    dd.add_argument("--all", action="store_true", help="discard every dead letter")
    dd.add_argument("--reason", help="why (kept in the audit record)")
    dd.add_argument("--dry-run", action="store_true", help="only count")
    dx = dsub.add_parser("discarded", help="list discarded dead letters (the audit records)")
    dx.add_argument("--topic")
    dx.add_argument("--limit", type=int, default=100)
    dx.add_argument("--json", action="store_true")
    du = dsub.add_parser("restore", help="make discarded rows dead letters again")
    du.add_argument("--id", dest="ids", type=int, action="append")
    du.add_argument("--topic")

    rt = sub.add_parser("retention", help="delete sent rows older than OUTBOX_RETENTION")
    rtsub = rt.add_subparsers(dest="action", required=True)
    rr = rtsub.add_parser("run", help="one run to the end, in small batches")
    rr.add_argument("--dry-run", action="store_true", help="only count")
    rr.add_argument("--older-than", help="override OUTBOX_RETENTION (e.g. 24h, 7d)")
    rr.add_argument("--batch-size", type=int, help="rows per DELETE (OUTBOX_RETENTION_BATCH)")

    rp = sub.add_parser(
        "replay", help="publish sent messages again (same idempotency keys, outbox-replay header)"
    )
    rp.add_argument("--topic", required=True)
    rp.add_argument("--since", help="created at or after: ISO 8601 (UTC if no zone) or 2h, 1d")
    rp.add_argument("--until", help="created before: ISO 8601 or a duration ago")
    rp.add_argument(
        "--ids", action="append", help="outbox ids, comma-separated (repeatable)", default=[]
    )
    rp.add_argument("--dry-run", action="store_true", help="only count")
    rp.add_argument("--batch-size", type=int, default=5000, help="rows re-queued per statement")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        from .logs import setup_logging

        setup_logging(settings.log_level, settings.log_format)
        logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
        handler = {
            "migrate": _migrate,
            "run": _run,
            "status": _status,
            "dead-letters": _dead_letters,
            "retention": _retention,
            "replay": _replay,
        }[args.command]
        return handler(args, settings)
    except OutboxError as exc:
        print(f"outbox-relay: error: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:  # a database error no command expected: still one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"outbox-relay: error: database: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        k: getattr(args, k, None)
        for k in (
            "database_url",
            "db_schema",
            "table",
            "sink",
            "kafka_bootstrap_servers",
            "batch_size",
            "poll_interval",
            "http_port",
            "relay_name",
            "shards",
        )
    }
    if getattr(args, "poll_only", False):
        overrides["wakeup"] = "poll"
    settings = load_settings(**overrides)
    props = getattr(args, "kafka_props", None)
    if props:
        merged = {**settings.kafka_properties, **dict(props)}
        settings = settings.model_copy(update={"kafka_properties": merged})
    return settings


@contextmanager
def _connect(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    url = settings.require_database_url()
    try:
        conn = psycopg.connect(conninfo(url), autocommit=True, application_name="outbox-relay cli")
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailable(f"cannot connect to {redact(url)}: {first}") from None
    with conn:
        yield conn


# ---------------------------------------------------------------------- migrate
def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    if getattr(args, "inbox", False):
        from .inbox import inbox_names
        from .inbox_migrations import HEAD as INBOX_HEAD
        from .inbox_migrations import SCRIPT_LOCATION as INBOX_LOCATION

        schema, table = inbox_names(
            args.db_schema or os.environ.get("OUTBOX_INBOX_SCHEMA") or settings.db_schema
        )
        return _alembic(
            args,
            settings,
            INBOX_LOCATION,
            INBOX_HEAD,
            "outbox_relay_inbox",
            {"schema": schema, "table": table},
            f"inbox schema {schema}.{table}",
        )
    from .migrations import HEAD, SCRIPT_LOCATION

    options = {"schema": settings.db_schema, "table": settings.table, "shards": settings.shards}
    return _alembic(
        args,
        settings,
        SCRIPT_LOCATION,
        HEAD,
        "outbox_relay",
        options,
        f"outbox schema {settings.db_schema}.{settings.table}",
    )


def _alembic(
    args: argparse.Namespace,
    settings: Settings,
    location: str,
    head: str,
    key: str,
    options: dict[str, object],
    what: str,
) -> int:
    """Upgrade (or ``--downgrade``, or print ``--sql``) one shipped branch."""
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    cfg = Config()
    cfg.set_main_option("script_location", location)
    cfg.attributes[key] = options
    if args.sql:
        cfg.set_main_option("sqlalchemy.url", "postgresql://")
        command.upgrade(cfg, head, sql=True)
        return 0
    url = settings.require_database_url()
    with _connect(settings):
        pass  # one clear line if the database is unreachable
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    try:
        if args.downgrade:
            command.downgrade(cfg, args.downgrade)
        else:
            command.upgrade(cfg, head)
    except CommandError as exc:
        raise ConfigError(f"migration failed: {exc}") from None
    print(f"{what} is at {args.downgrade or head} in {redact(url)}")
    return 0


# ---------------------------------------------------------------------- run
def _run(args: argparse.Namespace, settings: Settings) -> int:
    from .health import RelayState, serve
    from .relay import Relay

    sink = _make_sink(settings)
    state = RelayState(sink_detail=getattr(sink, "status", None))
    relay = Relay(settings, sink, state=state)
    server = serve(state, settings.http_host, settings.http_port) if settings.http_port else None

    def stop(signum: int, _frame: object) -> None:
        if relay.stopping:
            return
        log.info("signal %d: finishing the in-flight batch, then releasing leases", signum)
        relay.request_stop()
        timer = threading.Timer(settings.shutdown_timeout, _forced_exit, (settings,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # the sink's reachability check (a Kafka metadata round, ~0.1 s) runs while the relay
    # connects to Postgres; the relay publishes nothing before it has passed. Connecting first
    # also spares the first batch a stall: an idempotent producer whose first message comes
    # before its broker connection is up waits ~0.5 s longer for its producer id
    sink_checked = _in_background(sink.check)

    def checked() -> None:
        sink_checked()
        state.sink = True

    _steady_gc()
    try:
        return relay.run(before_drain=checked)
    finally:
        if server is not None:
            server.shutdown()


def _steady_gc() -> None:
    """Keep the cycle collector out of the drain. A round allocates tens of thousands of
    short-lived objects (rows, headers, outcomes), freed by reference counting, yet with the
    default thresholds the collector ran ~310 times per 200,000 messages, walking what start-up
    loaded each time (~0.2 s, ~1 µs of CPU per message). What is loaded now stays (frozen,
    never scanned); cycles are still collected, after 50,000 new objects instead of 700."""
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


def _in_background(fn: Any) -> Any:
    """Start ``fn()`` on a daemon thread; the returned callable waits for it to finish and
    raises what it raised (a daemon: an exit on another error never waits for it)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the caller)
            failure.append(exc)

    thread = threading.Thread(target=target, name="outbox-check", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return wait


def _forced_exit(settings: Settings) -> None:
    print(
        f"outbox-relay: error: shutdown did not finish within {settings.shutdown_timeout:g}s "
        "(OUTBOX_SHUTDOWN_TIMEOUT); exiting with the in-flight batch left pending",
        file=sys.stderr,
        flush=True,
    )
    os._exit(4)


def _make_sink(settings: Settings) -> Any:
    routed = settings.routes_file is not None or settings.sink == "webhook"
    if routed or settings.kafka_exactly_once:
        from .sinks.router import make_sink

        # a routes file, every topic to OUTBOX_WEBHOOK_URL, or Kafka exactly-once
        return make_sink(settings)
    if settings.sink == "kafka":
        from .sinks.kafka import KafkaSink

        return KafkaSink(settings)
    raise ConfigError(f"OUTBOX_SINK={settings.sink} is not available in this version")


# ---------------------------------------------------------------------- status
def _store(settings: Settings) -> Any:
    from .store import Store

    return Store(settings.db_schema, settings.table, settings.namespace)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from .guard import guard_problems, schema_problems
    from .migrations import HEAD

    store = _store(settings)
    with _connect(settings) as conn:
        meta = store.read_meta(conn)  # a schema behind is reported, not refused
        _revision, schema_issues = schema_problems(store, conn)
        status = store.status(conn)
        status.update(store.ops_status(conn))
        oldest = status.get("oldest_pending_s")
        problems = guard_problems(
            store,
            conn,
            settings,
            oldest_pending_s=float(oldest) if oldest is not None else None,
            dead_tuples=status["table"].get("dead_tuples"),
        )
    status["schema_revision"] = meta.get("revision")
    status["shards_total"] = int(meta.get("shards", 0))
    status["package_revision"] = SCHEMA_REVISION
    status["migration_head"] = HEAD
    status["schema_ok"] = not schema_issues
    status["schema_problems"] = schema_issues
    status["pending"] = sum(int(t["pending"]) for t in status["topics"])
    status["retention_s"] = settings.retention
    status["pending_slo_s"] = settings.pending_slo
    status["warnings"] = [p.as_dict() for p in problems]
    dead = {d["topic"]: int(d["dead"]) for d in status["dead_by_topic"]}
    now = status["db_time"]
    for t in status["topics"]:
        t["oldest_age_s"] = (now - t["oldest"]).total_seconds() if now and t["oldest"] else None
        t["dead"] = dead.pop(t["topic"], 0)
    status["topics"] += [
        {"topic": topic, "pending": 0, "oldest": None, "oldest_age_s": None, "dead": n}
        for topic, n in dead.items()
    ]
    status["topics"].sort(key=lambda t: t["topic"])
    del status["dead_by_topic"]
    status = _plain(status)
    if args.json:
        print(json.dumps(status, default=str, indent=2))
        return 0
    _print_status(settings, status)
    return 0


def _plain(value: Any) -> Any:
    """JSON-friendly: numbers as numbers (Decimal from extract(epoch ...)), times as ISO text."""
    import datetime as dt
    from decimal import Decimal

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def _size(n: Any) -> str:
    size = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def _print_status(settings: Settings, status: dict[str, Any]) -> None:
    print(
        f"outbox {settings.db_schema}.{settings.table}  revision {status['schema_revision']}  "
        f"shards {status['shards_total']}"
    )
    if status["schema_ok"]:
        print(f"schema        ok (package revision {status['package_revision']})")
    else:
        print(f"schema        PROBLEM: {'; '.join(status['schema_problems'])}")
    slo = status["pending_slo_s"]
    print(
        f"pending       {status['pending']}  oldest {_age(status['oldest_pending_s'])}"
        + (f" (SLO {_age(slo)})" if slo else "")
    )
    print(
        f"dead letters {status['dead_letters']}  sent last minute {status['sent_last_minute']}  "
        f"oldest pending {_age(status['oldest_pending_s'])}  discarded {status['discarded']}"
    )
    t = status["table"]
    vacuum = t.get("last_autovacuum") or t.get("last_vacuum") or "never"
    print(
        f"table         {_size(t.get('total_bytes'))}: heap {_size(t.get('heap_bytes'))}, "
        f"indexes {_size(t.get('index_bytes'))}, toast {_size(t.get('toast_bytes'))}; "
        f"tuples {t.get('live_tuples')} live / {t.get('dead_tuples')} dead; "
        f"last vacuum {vacuum}"
    )
    retention = status["retention_s"]
    print(f"retention     {_age(retention) if retention else 'off'} (OUTBOX_RETENTION)")
    relays = status["relays"]
    modes = {m: sum(1 for r in relays if r["listener"] == m) for m in ("notify", "poll")}
    print(
        f"relays        {len(relays)} (notify {modes['notify']}, poll {modes['poll']}); "
        f"{status['idle_shards']} of {status['shards_total']} shards flagged idle"
    )
    print()
    print(f"{'TOPIC':<32} {'PENDING':>10} {'OLDEST':>8} {'DEAD':>8}")
    for topic in status["topics"]:
        print(
            f"{topic['topic']:<32} {topic['pending']:>10} {_age(topic['oldest_age_s']):>8} "
            f"{topic['dead']:>8}"
        )
    print()
    print(f"{'RELAY':<28} {'ADDRESS':<22} {'BACKEND':>8} {'WAKE-UP':<8} {'SHARDS':>6}  SINCE")
    for r in relays:
        addr = f"{r['client_addr'] or 'local'}:{r['client_port'] or '-'}"
        print(
            f"{r['name']:<28} {addr:<22} {r['backend_pid']:>8} {r['listener']:<8} "
            f"{r['shards']:>6}  {r['backend_start']}"
        )
    print()
    owners: dict[str, list[int]] = {}
    for o in status["owners"]:
        who = f"{o['application_name']} pid {o['pid']}" if o["pid"] is not None else "(unowned)"
        owners.setdefault(who, []).append(o["shard"])
    print(f"{'OWNER':<48} SHARDS")
    for who, shards in sorted(owners.items()):
        print(f"{who:<48} {','.join(map(str, shards))}")
    if status["warnings"]:
        print()
        print("WARNINGS")
        for w in status["warnings"]:
            print(f"  {w['check']}: {w['message']}")


# ---------------------------------------------------------------------- dead letters
def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    if args.action in ("show", "discard", "discarded", "restore"):
        return _dead_letters_ops(args, settings, store)
    with _connect(settings) as conn:
        store.check_schema(conn)
        if args.action == "list":
            rows = store.dead_letters(conn, args.topic, args.limit)
            if args.json:
                print(json.dumps(rows, default=str, indent=2))
            else:
                print(f"{'ID':>10} {'TOPIC':<24} {'KEY':<16} {'ATTEMPTS':>8}  LAST ERROR")
                for r in rows:
                    print(
                        f"{r['id']:>10} {r['topic']:<24} {r['key']!s:<16} "
                        f"{r['attempts']:>8}  {r['last_error']}"
                    )
            return 0
        if not (args.ids or args.topic or args.all):
            raise ConfigError("dead-letters retry needs --id, --topic or --all")
        ids = store.retry_dead(conn, args.ids, args.topic)
        if ids:
            store.notify(conn, settings.channel, "")  # wake idle relays: an UPDATE fires no trigger
            _audit("retry", ids, args)
        print(f"re-queued {len(ids)} dead letter(s)")
        return 0


# ---------------------------------------------------------------------- operations
def _actor() -> str:
    """Who runs the command, for the audit trail: ``user@host``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _audit(action: str, ids: Sequence[int], args: argparse.Namespace, **extra: Any) -> None:
    """One structured log line per operator action (ids range and count, never payloads)."""
    log.info(
        "%s: %d row(s) by %s",
        action,
        len(ids),
        _actor(),
        extra={
            "action": action,
            "actor": _actor(),
            "reason": getattr(args, "reason", None),
            "rows": len(ids),
            "first_id": min(ids) if ids else None,
            "last_id": max(ids) if ids else None,
            **extra,
        },
    )


def _progress(label: str, done: int, total: int, final: bool = False) -> None:
    """A progress line on a TTY (stderr), nothing otherwise."""
    if not sys.stderr.isatty():
        return
    pct = 100.0 * done / total if total else 100.0
    sys.stderr.write(f"\r{label} {done}/{total} ({pct:.0f}%)" + ("\n" if final else ""))
    sys.stderr.flush()


def _state(row: dict[str, Any]) -> str:
    if row["dead_at"] is not None:
        return "discarded" if row["sent_at"] is not None else "dead letter"
    return "sent" if row["sent_at"] is not None else "pending"


def _dead_letters_ops(args: argparse.Namespace, settings: Settings, store: Any) -> int:
    with _connect(settings) as conn:
        store.read_meta(conn)
        if args.action == "show":
            row = store.show_row(conn, args.row_id)
            if row is None:
                raise OutboxError(f"no outbox row with id {args.row_id} (deleted by retention?)")
            row["state"] = _state(row)
            payload = bytes(row.pop("payload"))
            if args.payload:
                row["payload"] = payload.decode("utf-8", errors="replace")
            if args.json:
                print(json.dumps(_plain(row), default=str, indent=2))
                return 0
            for name, value in row.items():
                print(f"{name:<16} {value}")
            if not args.payload:
                print(f"{'payload':<16} ({row['payload_bytes']} bytes; --payload prints it)")
            return 0
        if args.action == "discarded":
            rows = store.discarded(conn, args.topic, args.limit)
            if args.json:
                print(json.dumps(_plain(rows), default=str, indent=2))
                return 0
            print(f"{'ID':>10} {'TOPIC':<24} {'DISCARDED AT':<33} DISCARD")
            for r in rows:
                print(f"{r['id']:>10} {r['topic']:<24} {r['discarded_at']!s:<33} {r['discard']}")
            return 0
        if not (args.ids or args.topic or getattr(args, "all", False)):
            raise ConfigError(
                f"dead-letters {args.action} needs --id or --topic"
                + (" (or --all)" if args.action == "discard" else "")
            )
        if args.action == "restore":
            ids = store.restore_discarded(conn, args.ids, args.topic)
            if ids:
                _audit("restore", ids, args)
            print(f"restored {len(ids)} discarded row(s) as dead letters")
            return _missing(args.ids, ids, "not discarded")
        if args.dry_run:
            print(f"would discard {store.dead_count(conn, args.ids, args.topic)} dead letter(s)")
            return 0
        ids = store.discard_dead(
            conn,
            args.ids,
            args.topic,
            actor=_actor(),
            reason=args.reason,
            batch=settings.retention_batch,
        )
        if ids:
            _audit("discard", ids, args, topic=args.topic)
        print(f"discarded {len(ids)} dead letter(s)")
        return _missing(args.ids, ids, "not dead letters")


def _missing(wanted: Sequence[int] | None, done: Sequence[int], what: str) -> int:
    missing = sorted(set(wanted or ()) - set(done))
    if missing:
        print(f"outbox-relay: {what}: {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    return 0


def _retention(args: argparse.Namespace, settings: Settings) -> int:
    from .retention import Retention, RetentionRun
    from .settings import parse_duration

    try:
        older = parse_duration(args.older_than) if args.older_than else settings.retention
    except ValueError as exc:
        raise ConfigError(f"invalid --older-than: {exc}") from None
    if older <= 0:
        raise ConfigError("retention is off (OUTBOX_RETENTION=0): pass --older-than to run once")
    store = _store(settings)
    retention = Retention(store, older, args.batch_size or settings.retention_batch)
    with _connect(settings) as conn:
        store.read_meta(conn)
        if args.dry_run:
            cutoff, found = retention.count(conn)
            ids = f" (ids {found['first_id']}..{found['last_id']})" if found["rows"] else ""
            print(f"would delete {found['rows']} sent row(s) older than {cutoff.isoformat()}{ids}")
            return 0
        if not store.try_retention_lock(conn):
            holder = store.retention_lock_holder(conn)
            who = (
                f" (backend pid {holder['pid']}, {holder['application_name']!r})" if holder else ""
            )
            raise OutboxError(f"another retention run holds the retention lock{who}; try later")
        try:
            total = int(store.table_stats(conn).get("live_tuples") or 0)

            def progress(run: RetentionRun) -> None:
                _progress("retention: scanned", run.scanned, max(total, run.scanned))

            run = retention.run(conn, progress=progress)
            _progress("retention: scanned", run.scanned, max(total, run.scanned), final=True)
        finally:
            store.retention_unlock(conn)
    summary = run.summary()
    print(
        f"deleted {run.deleted} sent row(s) older than {summary['cutoff']} in {run.batches} "
        f"batch(es) of up to {retention.batch}, {summary['seconds']:.2f}s "
        f"(longest statement {run.max_batch_seconds * 1000:.0f} ms)"
    )
    return 0


def _when(text: str | None, what: str) -> Any:
    """``--since``/``--until``: ISO 8601 (UTC when it has no zone) or a duration ago (2h, 1d)."""
    import datetime as dt

    from .settings import parse_duration

    if text is None:
        return None
    try:
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"invalid {what} {text!r}: expected ISO 8601 (2026-11-25T10:00:00Z) or 2h, 1d"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from .replay import ReplayProgress, Selection, count, replay

    try:
        ids = [int(i) for part in args.ids for i in part.split(",") if i.strip()]
    except ValueError:
        raise ConfigError("invalid --ids: expected comma-separated outbox ids") from None
    since, until = _when(args.since, "--since"), _when(args.until, "--until")
    if bool(ids) == (since is not None or until is not None):
        raise ConfigError("replay needs either --ids or --since [--until]")
    if until is not None and since is None:
        raise ConfigError("replay --until needs --since")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    sel = Selection(args.topic, ids or None, since, until)
    store = _store(settings)
    with _connect(settings) as conn:
        store.check_schema(conn)
        if args.dry_run:
            found = count(store, conn, sel)
        else:

            def progress(p: ReplayProgress) -> None:
                _progress("replay: re-queued", p.replayed, p.total)

            found = replay(
                store, conn, sel, channel=settings.channel, batch=args.batch_size, progress=progress
            )
            if found.replayed:
                _progress("replay: re-queued", found.replayed, found.sent, final=True)
    left = []
    if found.pending:
        left.append(f"{found.pending} still pending")
    if found.dead:
        left.append(f"{found.dead} dead letter(s)")
    note = f"; left alone: {', '.join(left)}" if left else ""
    if not found.sent and not settings.keep_sent:
        note += (
            "; delivered rows are deleted unless the relays run with OUTBOX_KEEP_SENT=true,"
            " so only rows kept that way can be replayed"
        )
    span = f" (ids {found.first_id}..{found.last_id})" if found.sent else ""
    if args.dry_run:
        print(f"would replay {found.sent} sent message(s) of {args.topic}{span}{note}")
        return 0
    if found.replayed:
        _audit(
            "replay",
            [found.first_id or 0, found.last_id or 0],
            args,
            topic=args.topic,
            replayed=found.replayed,
            marker=found.marker,
        )
    print(
        f"replaying {found.replayed} message(s) of {args.topic}{span}: re-queued with header "
        f"outbox-replay={found.marker}; the relay publishes them{note}"
    )
    if ids:
        return 1 if found.replayed < len(set(ids)) else 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
