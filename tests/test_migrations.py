"""Schema management: ``outbox-relay migrate`` standalone, inside a host's own alembic
environment (``alembic/`` + ``examples/shop``), and the CLI's one-line errors."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from types import ModuleType
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, pool
from sqlalchemy.orm import Session

from outbox_relay import include_outbox_objects
from outbox_relay.migrations import HEAD
from outbox_relay.settings import conninfo, producer_settings

from .conftest import REPO, run_cli

ALEMBIC = os.path.join(os.path.dirname(sys.executable), "alembic")
ALEMBIC_INI = "alembic/alembic.ini"
UNREACHABLE = "postgresql+psycopg://outbox:s3cret@127.0.0.1:1/outbox"


def sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def tables(url: str, schema: str) -> dict[str, str]:
    """Table name -> relpersistence ('p' permanent, 'u' unlogged) in ``schema``."""
    return {
        name: persistence
        for name, persistence in sql(
            url,
            "SELECT c.relname, c.relpersistence FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r'",
            (schema,),
        )
    }


def indexes(url: str, schema: str) -> set[str]:
    return {
        r[0] for r in sql(url, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,))
    }


def triggers(url: str, schema: str) -> set[str]:
    return {
        r[0]
        for r in sql(
            url,
            "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND NOT t.tgisinternal",
            (schema,),
        )
    }


def functions(url: str, schema: str) -> set[str]:
    return {
        r[0]
        for r in sql(
            url,
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s",
            (schema,),
        )
    }


OUTBOX_TABLES = {
    "outbox", "outbox_shards", "outbox_wakeup", "outbox_meta", "outbox_keyseq", "outbox_sent_stats",
}
OUTBOX_INDEXES = {
    "outbox_pending_idx", "outbox_held_idx", "outbox_dead_idx", "outbox_unsequenced_idx",
    "outbox_seq_pending_idx",
}


@pytest.fixture
def schema(db_url: str) -> Iterator[str]:
    """A unique schema name; dropped (with everything in it) at teardown."""
    name = f"m_{uuid.uuid4().hex[:10]}"
    yield name
    sql(db_url, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def cli_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(overrides)
    return env


def assert_one_line_error(done: Any) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("outbox-relay: error: "), err
    assert "Traceback" not in done.stderr
    return err


# ---------------------------------------------------------------------- standalone migrate
def test_migrate_creates_the_outbox_and_is_idempotent(db_url: str, schema: str) -> None:
    env = cli_env(OUTBOX_DATABASE_URL=db_url, OUTBOX_SCHEMA=schema, OUTBOX_SHARDS="5")
    first = run_cli("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert f"outbox schema {schema}.outbox is at {HEAD}" in first.stdout
    assert "outbox:***@" in first.stdout and "outbox:outbox@" not in first.stdout

    found = tables(db_url, schema)
    assert set(found) == {*OUTBOX_TABLES, "outbox_relay_version"}
    assert found["outbox_wakeup"] == "u"  # unlogged: the idle flags are not WAL-logged
    assert found["outbox"] == "p"
    assert indexes(db_url, schema) >= OUTBOX_INDEXES
    assert triggers(db_url, schema) == {"outbox_notify", "outbox_assign_seq"}
    assert "outbox_notify" in functions(db_url, schema)
    meta = dict(sql(db_url, f'SELECT name, value FROM "{schema}".outbox_meta'))
    assert meta == {"shards": "5", "revision": "0003", "channel": f"outbox_relay.{schema}.outbox"}
    shard_rows = sql(db_url, f'SELECT shard FROM "{schema}".outbox_shards ORDER BY shard')
    assert [r[0] for r in shard_rows] == [0, 1, 2, 3, 4]
    wake_rows = sql(db_url, f'SELECT shard, idle FROM "{schema}".outbox_wakeup ORDER BY shard')
    assert wake_rows == [(i, False) for i in range(5)]
    assert sql(db_url, f'SELECT version_num FROM "{schema}".outbox_relay_version') == [(HEAD,)]
    reloptions = sql(
        db_url,
        "SELECT c.reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = 'outbox'",
        (schema,),
    )[0][0]
    assert "fillfactor=70" in reloptions

    second = run_cli("migrate", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stderr.strip() == ""
    # nothing was created twice
    assert len(sql(db_url, f'SELECT shard FROM "{schema}".outbox_shards')) == 5
    assert set(tables(db_url, schema)) == {*OUTBOX_TABLES, "outbox_relay_version"}


def test_migrate_flags_override_the_environment(db_url: str, schema: str) -> None:
    env = cli_env(OUTBOX_DATABASE_URL=UNREACHABLE, OUTBOX_SCHEMA="ignored")
    done = run_cli(
        "--database-url",
        db_url,
        "--schema",
        schema,
        "--table",
        "events",
        "migrate",
        "--shards",
        "3",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert {"events", "events_shards", "events_wakeup", "events_meta"} <= set(
        tables(db_url, schema)
    )
    assert triggers(db_url, schema) == {"events_notify", "events_assign_seq"}
    assert dict(sql(db_url, f'SELECT name, value FROM "{schema}".events_meta'))["shards"] == "3"


def test_migrate_sql_needs_no_database(schema: str) -> None:
    env = cli_env(OUTBOX_DATABASE_URL=UNREACHABLE, OUTBOX_SCHEMA=schema, OUTBOX_SHARDS="4")
    done = run_cli("migrate", "--sql", env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    ddl = done.stdout
    assert f"CREATE TABLE {schema}.outbox (" in ddl
    assert f"CREATE UNLOGGED TABLE {schema}.outbox_wakeup" in ddl
    assert f'CREATE TRIGGER "outbox_notify" AFTER INSERT ON "{schema}"."outbox"' in ddl
    assert "FOR EACH STATEMENT" in ddl
    assert f"pg_notify('outbox_relay.{schema}.outbox'" in ddl
    assert "CREATE INDEX outbox_pending_idx" in ddl
    assert "generate_series(0, 3)" in ddl
    assert "outbox_relay_version" in ddl
    assert ddl.rstrip().endswith("COMMIT;")
    assert "Traceback" not in done.stderr


def test_migrate_sql_output_applies_cleanly(db_url: str, schema: str) -> None:
    """What --sql prints is what migrate runs: feed it to the database and get the outbox."""
    env = cli_env(OUTBOX_DATABASE_URL=UNREACHABLE, OUTBOX_SCHEMA=schema, OUTBOX_SHARDS="2")
    done = run_cli("migrate", "--sql", env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(conninfo(db_url), autocommit=True) as conn:
        conn.execute(done.stdout.encode())
    assert set(tables(db_url, schema)) == {*OUTBOX_TABLES, "outbox_relay_version"}
    status = run_cli("status", env=cli_env(OUTBOX_DATABASE_URL=db_url, OUTBOX_SCHEMA=schema))
    assert status.returncode == 0, status.stderr
    assert "revision 0003" in status.stdout and "shards 2" in status.stdout


def test_downgrade_removes_the_outbox(db_url: str, schema: str) -> None:
    env = cli_env(OUTBOX_DATABASE_URL=db_url, OUTBOX_SCHEMA=schema, OUTBOX_SHARDS="2")
    assert run_cli("migrate", env=env).returncode == 0
    sql(db_url, f'CREATE TABLE "{schema}".host_table (id int)')  # not the outbox's: kept

    down = run_cli("migrate", "--downgrade", "base", env=env)
    assert down.returncode == 0, down.stderr
    assert f"outbox schema {schema}.outbox is at base" in down.stdout
    left = tables(db_url, schema)
    assert not (OUTBOX_TABLES & set(left)), left
    assert "host_table" in left
    assert triggers(db_url, schema) == set()
    assert functions(db_url, schema) == set()
    assert sql(db_url, f'SELECT version_num FROM "{schema}".outbox_relay_version') == []

    again = run_cli("migrate", env=env)  # and back up
    assert again.returncode == 0, again.stderr
    assert set(tables(db_url, schema)) >= OUTBOX_TABLES
    status = run_cli("status", env=env)
    assert status.returncode == 0, status.stderr


# ---------------------------------------------------------------------- CLI errors
def test_unreachable_database_is_one_line(schema: str) -> None:
    env = cli_env(OUTBOX_DATABASE_URL=UNREACHABLE, OUTBOX_SCHEMA=schema)
    for args in (("migrate",), ("status",), ("migrate", "--downgrade", "base")):
        done = run_cli(*args, env=env, timeout=30)
        err = assert_one_line_error(done)
        assert "cannot connect" in err
        assert "127.0.0.1:1" in err
        assert "s3cret" not in err and "outbox:***@" in err  # the password is redacted


def test_missing_database_url(schema: str) -> None:
    done = run_cli("migrate", env=cli_env(OUTBOX_SCHEMA=schema))
    err = assert_one_line_error(done)
    assert "OUTBOX_DATABASE_URL is not set" in err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OUTBOX_SHARDS", "abc"),
        ("OUTBOX_SHARDS", "0"),
        ("OUTBOX_SCHEMA", "bad-name; drop table x"),
        ("OUTBOX_TABLE", "1table"),
        ("OUTBOX_MAX_PAYLOAD_BYTES", "lots"),
    ],
)
def test_bad_setting_is_one_line_naming_it(db_url: str, variable: str, value: str) -> None:
    env = cli_env(OUTBOX_DATABASE_URL=db_url, **{variable: value})
    for args in (("migrate",), ("migrate", "--sql")):
        done = run_cli(*args, env=env)
        err = assert_one_line_error(done)
        assert f"invalid setting {variable}" in err


def test_status_without_an_outbox(db_url: str, schema: str) -> None:
    sql(db_url, f'CREATE SCHEMA "{schema}"')
    for target in (schema, f"n_{uuid.uuid4().hex[:10]}"):  # empty schema, then no schema
        done = run_cli("status", env=cli_env(OUTBOX_DATABASE_URL=db_url, OUTBOX_SCHEMA=target))
        err = assert_one_line_error(done)
        assert f"outbox table {target}.outbox does not exist" in err
        assert "outbox-relay migrate" in err


# ---------------------------------------------------------------------- host example
def alembic(*args: str, host_schema: str, outbox_schema: str, url: str) -> Any:
    env = cli_env(OUTBOX_DATABASE_URL=url)
    return subprocess.run(
        [
            ALEMBIC,
            "-c",
            ALEMBIC_INI,
            "-x",
            f"host_schema={host_schema}",
            "-x",
            f"outbox_schema={outbox_schema}",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def host(db_url: str, schema: str, outbox_schema: str | None = None) -> Callable[..., Any]:
    """``alembic -c alembic/alembic.ini -x host_schema=... -x outbox_schema=... <args>``."""
    return partial(alembic, host_schema=schema, outbox_schema=outbox_schema or schema, url=db_url)


def shop(module: str = "examples.shop") -> ModuleType:
    """Import the example app from the repository (it is not an installed package)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(module)


def ok(done: Any) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return str(done.stdout + done.stderr)


HOST_TABLES = {"customers", "orders"}


def test_host_alembic_upgrades_both_branches(db_url: str, schema: str) -> None:
    run = host(db_url, schema)

    heads = ok(run("heads"))
    assert "host_0001 (shop) (head)" in heads
    assert f"{HEAD} (outbox_relay) (head)" in heads

    ok(run("upgrade", "heads"))
    found = tables(db_url, schema)
    assert set(found) == {*HOST_TABLES, *OUTBOX_TABLES, "alembic_version"}
    assert triggers(db_url, schema) == {"outbox_notify", "outbox_assign_seq"}
    assert {"ix_orders_customer_id", *OUTBOX_INDEXES} <= indexes(db_url, schema)
    # both branches recorded in the HOST's version table, in the host schema
    versions = {r[0] for r in sql(db_url, f'SELECT version_num FROM "{schema}".alembic_version')}
    assert versions == {"host_0001", HEAD}
    # nothing leaked into public
    leaked = sql(
        db_url,
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
        "AND tablename IN ('customers', 'orders')",
    )
    assert leaked == []

    current = ok(run("current"))
    assert "host_0001 (head)" in current and f"{HEAD} (head)" in current

    # autogenerate sees the host's models in sync and ignores the outbox tables
    check = run("check")
    assert check.returncode == 0, check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_host_alembic_check_detects_real_drift(db_url: str, schema: str) -> None:
    """`alembic check` is not vacuous: a change to the host's tables is reported."""
    run = host(db_url, schema)
    ok(run("upgrade", "heads"))
    sql(db_url, f'ALTER TABLE "{schema}".orders DROP COLUMN status')
    check = run("check")
    assert check.returncode != 0
    out = check.stdout + check.stderr
    assert "New upgrade operations detected" in out
    assert "orders.status" in out or "'status'" in out
    assert "outbox" not in out.split("New upgrade operations detected", 1)[1]


def test_include_outbox_objects_hides_exactly_the_outbox(db_url: str, schema: str) -> None:
    """Without the hook autogenerate would drop the outbox tables; with it, nothing."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    base = shop("examples.shop.models").Base

    ok(host(db_url, schema)("upgrade", "heads"))
    eng = create_engine(
        db_url, poolclass=pool.NullPool, connect_args={"options": f"-c search_path={schema}"}
    )
    try:
        with eng.connect() as conn:

            def diff(**opts: Any) -> list[Any]:
                ctx = MigrationContext.configure(
                    conn, opts={"target_metadata": base.metadata, **opts}
                )
                return compare_metadata(ctx, base.metadata)

            without = diff()
            dropped = {d[1].name for d in without if d[0] == "remove_table"}
            assert dropped >= OUTBOX_TABLES
            assert not (HOST_TABLES & dropped)
            assert diff(include_name=include_outbox_objects) == []
    finally:
        eng.dispose()


def test_host_downgrade_outbox_branch_only_then_base(db_url: str, schema: str) -> None:
    run = host(db_url, schema)
    ok(run("upgrade", "heads"))
    sql(db_url, f"INSERT INTO \"{schema}\".customers (email, name) VALUES ('a@x', 'A')")

    ok(run("downgrade", "outbox_relay@base"))
    found = set(tables(db_url, schema))
    assert found >= HOST_TABLES
    assert not (OUTBOX_TABLES & found)
    assert triggers(db_url, schema) == set() and functions(db_url, schema) == set()
    assert sql(db_url, f'SELECT email FROM "{schema}".customers') == [("a@x",)]  # data kept
    versions = {r[0] for r in sql(db_url, f'SELECT version_num FROM "{schema}".alembic_version')}
    assert versions == {"host_0001"}

    ok(run("upgrade", "outbox_relay@head"))  # re-adopt the outbox
    assert set(tables(db_url, schema)) >= OUTBOX_TABLES

    ok(run("downgrade", "base"))
    assert set(tables(db_url, schema)) == {"alembic_version"}
    assert triggers(db_url, schema) == set() and functions(db_url, schema) == set()
    assert sql(db_url, f'SELECT version_num FROM "{schema}".alembic_version') == []


def test_host_outbox_in_its_own_schema(db_url: str, schema: str) -> None:
    """Host tables in one schema, the outbox in another: `check` is still clean."""
    outbox_schema = f"{schema}_ob"
    try:
        run = host(db_url, schema, outbox_schema)
        ok(run("upgrade", "heads"))
        assert set(tables(db_url, schema)) == {*HOST_TABLES, "alembic_version"}
        assert set(tables(db_url, outbox_schema)) == OUTBOX_TABLES
        assert "No new upgrade operations detected" in ok(run("check"))
        ok(run("downgrade", "base"))
        assert set(tables(db_url, outbox_schema)) == set()
    finally:
        sql(db_url, f'DROP SCHEMA IF EXISTS "{outbox_schema}" CASCADE')


def test_host_offline_sql(schema: str) -> None:
    env = cli_env(OUTBOX_DATABASE_URL=UNREACHABLE)
    done = subprocess.run(
        [
            ALEMBIC,
            "-c",
            ALEMBIC_INI,
            "-x",
            f"host_schema={schema}",
            "-x",
            f"outbox_schema={schema}",
            "upgrade",
            "heads",
            "--sql",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = ok(done)
    assert f"CREATE TABLE {schema}.customers" in out
    assert f"CREATE TABLE {schema}.orders" in out
    assert f"CREATE TABLE {schema}.outbox (" in out
    assert "CREATE TRIGGER" in out
    assert f'SET search_path TO "{schema}"' in out
    assert "INSERT INTO alembic_version (version_num) VALUES ('host_0001')" in out


def test_host_app_writes_order_and_message_atomically(
    db_url: str, schema: str, monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> None:
    """The example app on its migrated schema: the outbox row commits with the order."""
    app = shop()

    ok(host(db_url, schema)("upgrade", "heads"))
    monkeypatch.setenv("OUTBOX_SCHEMA", schema)
    producer_settings.cache_clear()
    try:
        translated = engine.execution_options(schema_translate_map={None: schema})
        with Session(translated, expire_on_commit=False) as session, session.begin():
            alice = app.Customer(email="alice@example.com", name="Alice")
            session.add(alice)
            order, sent = app.place_order(session, alice, 1250)
        assert sent.created and sent.idempotency_key == f"order-placed-{order.id}"
        with Session(translated) as session:
            session.begin()
            bob = app.Customer(email="bob@example.com", name="Bob")
            session.add(bob)
            app.place_order(session, bob, 99)
            session.rollback()
        with Session(translated) as session:
            assert [o.total_cents for o in session.query(app.Order).all()] == [1250]
    finally:
        producer_settings.cache_clear()
    msgs = sql(db_url, f'SELECT topic, key, payload, headers FROM "{schema}".outbox')
    assert len(msgs) == 1
    topic, key, payload, headers = msgs[0]
    assert (topic, key) == ("orders.placed", f"customer-{order.customer_id}")
    assert (
        bytes(payload)
        == (
            f'{{"order_id":{order.id},"customer_id":{order.customer_id},"total_cents":1250}}'
        ).encode()
    )
    assert headers == {"event-type": "orders.placed"}
