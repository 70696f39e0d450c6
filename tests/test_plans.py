"""The relay's statements keep their index plans when an idle, emptied outbox gets a burst.

An outbox is empty most of the time and a vacuum truncates it to no pages at all. Prepared
statements planned then read the whole table; without the relay's session setting Postgres keeps
such a generic plan until the next ANALYZE, so a burst landing on an idle relay was drained by
fetches and marks that each read every row. Real Postgres; plans read with EXPLAIN EXECUTE.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

from outbox_relay.settings import conninfo
from outbox_relay.store import Store

from .conftest import Outbox

SHARDS = "'{0,1,2,3,4,5,6,7}'"
#: the fetch's parameters (SQL literals): every shard of 8 from its start, 100 rows each
FETCH = {
    "shards": SHARDS,
    "after": "'{0,0,0,0,0,0,0,0}'",
    "blocked": "'{}'",
    "limits": "'{100,100,100,100,100,100,100,100}'",
}
#: a sequential scan of the outbox itself (its small side tables may well be scanned)
WHOLE_TABLE = re.compile(r"Seq Scan on outbox(?!_)")


def _explain_prepared(
    conn: psycopg.Connection[Any], store: Store, name: str, args: dict[str, str]
) -> str:
    """The plan the session would run for its prepared statement ``name`` now, with ``args``
    (SQL literals by parameter name)."""
    text = store._q[name].as_string(conn)
    order = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", text)))
    numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${order.index(m.group(1)) + 1}", text)
    row = conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE statement = %s", (numbered,)
    ).fetchone()
    assert row is not None, f"{name} is not prepared on this session"
    values = ", ".join(args[n] for n in order)
    return "\n".join(r[0] for r in conn.execute(f"EXPLAIN EXECUTE {row[0]}({values})"))


def test_an_idle_relays_statements_read_a_burst_by_index(outbox: Outbox) -> None:
    table = f'"{outbox.schema}"."outbox"'
    # no autovacuum during the test: an ANALYZE would replan every session's statements
    outbox.sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    outbox.sql(f"VACUUM {table}")  # empty: no pages, no rows, as a vacuum leaves it
    store = Store(outbox.schema, "outbox", 4243)
    shards = list(range(outbox.shards))
    mark = {
        "ids": "'{1,2,3}'",
        "created_max": "'Infinity'",
        "lease_shards": SHARDS,
        "epochs": "'{1,1,1,1,1,1,1,1}'",
    }
    held = {"shards": SHARDS, "strict": "false"}
    with (
        psycopg.connect(conninfo(outbox.url), autocommit=True) as relay,
        psycopg.connect(conninfo(outbox.url), autocommit=True) as plain,
    ):
        store.tune_session(relay)
        epochs = {sh: store.take_epoch(relay, sh, "test") for sh in shards}
        for conn in (relay, plain):
            for _ in range(6):  # beyond the five custom plans Postgres makes before a generic one
                assert store.fetch(conn, shards, [], 100, [0] * len(shards)) == []
                assert store.mark_sent(conn, [1, 2, 3], epochs, keep=False) == 0
                store.held(conn, shards, False, list_running=True)
        outbox.sql(
            f"INSERT INTO {table} (idempotency_key, topic, key, payload)"
            " SELECT 'k' || i, 'orders', 'key-' || (i % 100), convert_to(repeat('x', 900), 'UTF8')"
            " FROM generate_series(1, 20000) AS i"
        )
        # without the setting the session keeps reading the whole table: the test's own premise
        assert WHOLE_TABLE.search(_explain_prepared(plain, store, "fetch", FETCH))
        assert WHOLE_TABLE.search(_explain_prepared(plain, store, "delete_sent", mark))

        for name, args in (("fetch", FETCH), ("delete_sent", mark), ("held", held)):
            plan = _explain_prepared(relay, store, name, args)
            assert not WHOLE_TABLE.search(plan), f"{name}:\n{plan}"
        assert "outbox_pending_idx" in _explain_prepared(relay, store, "fetch", FETCH)
        assert "outbox_pkey" in _explain_prepared(relay, store, "delete_sent", mark)
        # pending_idx would serve the held-rows query too, filtering every pending row
        assert "outbox_held_idx" in _explain_prepared(relay, store, "held", held)


def test_the_relays_sessions_never_jit_compile_a_fetch(outbox: Outbox) -> None:
    """The fetch's per-shard LIMIT is a parameter, so Postgres assumes a tenth of the table and
    the estimated cost grows with the backlog; past ``jit_above_cost`` each fetch was compiled
    (~330 ms per fetch on a 1M-row backlog). ``jit_above_cost = 0`` stands in for a big table."""
    store = Store(outbox.schema, "outbox", 4243)
    shards = list(range(outbox.shards))
    with (
        psycopg.connect(conninfo(outbox.url), autocommit=True) as relay,
        psycopg.connect(conninfo(outbox.url), autocommit=True) as plain,
    ):
        store.tune_session(relay)
        for conn in (relay, plain):
            conn.execute("SET jit_above_cost = 0")
            store.fetch(conn, shards, [], 100, [0] * len(shards))
        jit = plain.execute("SELECT pg_jit_available()").fetchone()
        if jit and jit[0]:  # the premise, where this server can compile at all
            assert "JIT:" in _explain_prepared(plain, store, "fetch", FETCH)
        assert "JIT:" not in _explain_prepared(relay, store, "fetch", FETCH)
        assert relay.execute("SHOW jit").fetchone() == ("off",)
