"""``outbox-relay`` command line: migrate, run, status, dead-letters.

Every expected failure prints one line ``outbox-relay: error: ...`` and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
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

from .errors import ConfigError, DatabaseUnavailable, OutboxError
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
    p.add_argument("--database-url", help="OUTBOX_DATABASE_URL")
    p.add_argument("--schema", dest="db_schema", help="OUTBOX_SCHEMA (default public)")
    p.add_argument("--table", help="OUTBOX_TABLE (default outbox)")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="upgrade the outbox schema to head (or print its SQL)")
    m.add_argument("--sql", action="store_true", help="print the DDL instead (no database)")
    m.add_argument("--shards", type=int, help="OUTBOX_SHARDS, fixed when the table is created")
    m.add_argument("--downgrade", metavar="REV", help="downgrade to REV (e.g. base)")

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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        logging.basicConfig(
            level=settings.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))
        handler = {
            "migrate": _migrate,
            "run": _run,
            "status": _status,
            "dead-letters": _dead_letters,
        }[args.command]
        return handler(args, settings)
    except OutboxError as exc:
        print(f"outbox-relay: error: {exc}", file=sys.stderr)
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
    from alembic import command
    from alembic.config import Config
    from alembic.util import CommandError

    from .migrations import HEAD, SCRIPT_LOCATION

    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes["outbox_relay"] = {
        "schema": settings.db_schema,
        "table": settings.table,
        "shards": settings.shards,
    }
    if args.sql:
        cfg.set_main_option("sqlalchemy.url", "postgresql://")
        command.upgrade(cfg, HEAD, sql=True)
        return 0
    url = settings.require_database_url()
    with _connect(settings):
        pass  # one clear line if the database is unreachable
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    try:
        if args.downgrade:
            command.downgrade(cfg, args.downgrade)
        else:
            command.upgrade(cfg, HEAD)
    except CommandError as exc:
        raise ConfigError(f"migration failed: {exc}") from None
    print(
        f"outbox schema {settings.db_schema}.{settings.table} is at "
        f"{args.downgrade or HEAD} in {redact(url)}"
    )
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
    sink.check()
    state.sink = True
    try:
        return relay.run()
    finally:
        if server is not None:
            server.shutdown()


def _forced_exit(settings: Settings) -> None:
    print(
        f"outbox-relay: error: shutdown did not finish within {settings.shutdown_timeout:g}s "
        "(OUTBOX_SHUTDOWN_TIMEOUT); exiting with the in-flight batch left pending",
        file=sys.stderr,
        flush=True,
    )
    os._exit(4)


def _make_sink(settings: Settings) -> Any:
    if settings.routes_file is not None or settings.sink == "webhook":
        from .sinks.router import make_sink

        return make_sink(settings)  # a routes file, or every topic to OUTBOX_WEBHOOK_URL
    if settings.sink == "kafka":
        from .sinks.kafka import KafkaSink

        return KafkaSink(settings)
    raise ConfigError(f"OUTBOX_SINK={settings.sink} is not available in this version")


# ---------------------------------------------------------------------- status
def _store(settings: Settings) -> Any:
    from .store import Store

    return Store(settings.db_schema, settings.table, settings.namespace)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    with _connect(settings) as conn:
        meta = store.check_schema(conn)
        status = store.status(conn)
    status["schema_revision"] = meta.get("revision")
    status["shards_total"] = int(meta.get("shards", 0))
    if args.json:
        print(json.dumps(status, default=str, indent=2))
        return 0
    print(
        f"outbox {settings.db_schema}.{settings.table}  revision {status['schema_revision']}  "
        f"shards {status['shards_total']}"
    )
    oldest = status.get("oldest_pending_s")
    print(
        f"dead letters {status['dead_letters']}  sent last minute {status['sent_last_minute']}  "
        f"oldest pending {'-' if oldest is None else f'{float(oldest):.1f}s'}"
    )
    print(f"{'TOPIC':<32} {'PENDING':>10}")
    for t in status["topics"]:
        print(f"{t['topic']:<32} {t['pending']:>10}")
    owners: dict[str, list[int]] = {}
    for o in status["owners"]:
        who = f"{o['application_name']} pid {o['pid']}" if o["pid"] is not None else "(unowned)"
        owners.setdefault(who, []).append(o["shard"])
    print(f"{'OWNER':<48} SHARDS")
    for who, shards in sorted(owners.items()):
        print(f"{who:<48} {','.join(map(str, shards))}")
    return 0


# ---------------------------------------------------------------------- dead letters
def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
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
        print(f"re-queued {len(ids)} dead letter(s)")
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
