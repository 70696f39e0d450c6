"""Schema drift check, Postgres-health guard and the relay's maintenance tick.

The outbox lives in the application's primary database, so its health is the application's:

* **schema** -- the meta revision must equal the package's ``SCHEMA_REVISION``, and the outbox's
  columns, indexes (valid) and triggers (enabled) must be those ``schema.py`` defines. Drift
  that alembic cannot see (an index dropped by hand, a trigger disabled, a failed
  ``CREATE INDEX CONCURRENTLY``) makes ``/readyz`` answer 503 until it is fixed;
* **xmin horizon** -- a long transaction, an old prepared transaction or a replication slot keeps
  vacuum from removing the outbox's dead rows (every sent-and-deleted row is one), so the
  table and its indexes bloat and the drain slows: warned about, never acted on;
* **dead tuples** of the outbox above a threshold; **oldest pending** message above the SLO.

Problems are logged (warning when they appear, again every :data:`REPEAT_WARNING` seconds while
they last, info when they clear), exported as ``outbox_guard_problem{check=...}`` and shown by
``/readyz`` (``warnings``) and ``outbox-relay status``. Query texts of other sessions are never
read: they may hold secrets or payloads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from . import metrics
from .errors import OutboxTableMissing
from .health import RelayState
from .retention import SLICE_SECONDS, Retention, RetentionRun
from .schema_version import SCHEMA_REVISION
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)

#: Seconds between repeated warnings about a problem that persists.
REPEAT_WARNING = 300.0
#: While the relay is behind (its rounds read full batches), the pending counts refresh this
#: many times less often: counting a large backlog is a scan of the table that holds up the
#: rounds draining it (~2 s for a million pending rows)
BEHIND_GAUGE_FACTOR = 12
#: The guard's checks (labels of ``outbox_guard_problem``).
CHECKS = ("xmin_horizon", "prepared_xact", "replication_slot", "dead_tuples", "pending_slo")

_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


@dataclass(frozen=True)
class Problem:
    check: str
    message: str
    detail: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# ---------------------------------------------------------------------- schema and drift
@dataclass(frozen=True)
class Expected:
    tables: frozenset[str]
    columns: frozenset[str]
    indexes: frozenset[str]
    triggers: frozenset[str]


def expected_objects(schema: str, table: str) -> Expected:
    """What ``schema.py`` defines at the package's revision: tables, outbox columns, outbox
    indexes (with the primary key and the unique idempotency-key constraint, as Postgres names
    them) and outbox triggers."""
    from .schema import build_tables  # SQLAlchemy: loaded on the first drift check only

    tables = build_tables(schema, table)
    outbox = tables.outbox
    indexes = {str(ix.name) for ix in outbox.indexes}
    indexes |= {f"{table}_pkey", f"{table}_idempotency_key_key"}
    triggers = {tables.notify_function}
    sequence_function = getattr(tables, "sequence_function", None)
    if sequence_function and getattr(tables, "keyseq", None) is not None:
        triggers.add(str(sequence_function))
    return Expected(
        tables=frozenset(tables.names),
        columns=frozenset(c.name for c in outbox.columns),
        indexes=frozenset(indexes),
        triggers=frozenset(triggers),
    )


def schema_problems(
    store: Store, conn: psycopg.Connection[Any], expected: Expected | None = None
) -> tuple[str | None, list[str]]:
    """The database's revision and what is wrong with the schema (empty list: all as expected).

    Drift is only looked for at the expected revision: a schema behind is one problem.
    ``expected``: the objects to look for (default: :func:`expected_objects`).
    """
    revision, problems = revision_problems(store, conn)
    if problems:
        return revision, problems
    return revision, _drift(store, conn, expected or expected_objects(store.schema, store.table))


def revision_problems(store: Store, conn: psycopg.Connection[Any]) -> tuple[str | None, list[str]]:
    """The database's revision, and the problem if it is not the package's."""
    try:
        meta = store.read_meta(conn)
    except OutboxTableMissing as exc:
        return None, [str(exc)]
    revision = meta.get("revision")
    if revision != SCHEMA_REVISION:
        return revision, [
            f"the outbox is at revision {revision!r}, this package expects {SCHEMA_REVISION!r}"
            " (run `outbox-relay migrate`)"
        ]
    return revision, []


def _drift(store: Store, conn: psycopg.Connection[Any], expected: Expected) -> list[str]:
    """Objects of ``expected`` missing from the database, or there but invalid or disabled."""
    found: dict[str, dict[str, bool]] = {}
    for kind, name, ok in store.schema_objects(conn, sorted(expected.tables)):
        found.setdefault(kind, {})[name] = ok
    problems = []
    for kind, names in (
        ("table", expected.tables),
        ("column", expected.columns),
        ("index", expected.indexes),
        ("trigger", expected.triggers),
    ):
        have = found.get(kind, {})
        missing = sorted(names - have.keys())
        if missing:
            problems.append(f"missing {kind}{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        broken = sorted(n for n in names & have.keys() if not have[n])
        if broken:
            what = "invalid" if kind == "index" else "disabled"
            problems.append(f"{what} {kind}{'s' if len(broken) > 1 else ''} {', '.join(broken)}")
    return problems


# ---------------------------------------------------------------------- health guard
def _who(h: dict[str, Any]) -> str:
    parts = [f"pid {h['pid']}"]
    if h.get("application_name"):
        parts.append(f"application {h['application_name']!r}")
    if h.get("usename"):
        parts.append(f"user {h['usename']}")
    if h.get("client_addr"):
        parts.append(f"from {h['client_addr']}")
    return ", ".join(parts)


def guard_problems(
    store: Store,
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    oldest_pending_s: float | None,
    dead_tuples: int | None,
) -> list[Problem]:
    """Run the guard's checks; ``oldest_pending_s``/``dead_tuples`` come from the caller's
    own (cheaper or already made) queries."""
    problems = []
    holders = store.xact_holders(conn, settings.guard_xact_age)
    if holders:
        oldest = holders[0]
        problems.append(
            Problem(
                "xmin_horizon",
                f"{len(holders)} transaction(s) open longer than {settings.guard_xact_age:g}s "
                f"hold back the xmin horizon, so vacuum cannot clean the outbox; oldest: "
                f"{_who(oldest)}, open {oldest['xact_age_s']:.0f}s, state {oldest['state']}",
                _plain(holders),
            )
        )
    prepared = store.prepared_holders(conn, settings.guard_xact_age)
    if prepared:
        problems.append(
            Problem(
                "prepared_xact",
                f"{len(prepared)} prepared transaction(s) older than {settings.guard_xact_age:g}s "
                f"hold back the xmin horizon (oldest gid {prepared[0]['gid']!r}, "
                f"{prepared[0]['age_s']:.0f}s): COMMIT PREPARED or ROLLBACK PREPARED them",
                _plain(prepared),
            )
        )
    slots = store.slot_holders(conn, settings.guard_slot_xmin_age)
    if slots:
        s = slots[0]
        problems.append(
            Problem(
                "replication_slot",
                f"replication slot {s['slot_name']!r} ({'active' if s['active'] else 'INACTIVE'})"
                f" holds the xmin horizon {s['xmin_age']} transactions back"
                + (f" (+{len(slots) - 1} more)" if len(slots) > 1 else ""),
                _plain(slots),
            )
        )
    if dead_tuples is not None and dead_tuples > settings.guard_dead_tuples:
        problems.append(
            Problem(
                "dead_tuples",
                f"the outbox table has {dead_tuples} dead tuples (threshold "
                f"{settings.guard_dead_tuples}): is autovacuum keeping up, is the horizon held?",
            )
        )
    slo = settings.pending_slo
    if slo > 0 and oldest_pending_s is not None and oldest_pending_s > slo:
        problems.append(
            Problem(
                "pending_slo",
                f"the oldest pending message is {oldest_pending_s:.0f}s old, over the "
                f"OUTBOX_PENDING_SLO of {slo:g}s",
            )
        )
    return problems


def _plain(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON-ready rows: numbers, strings, booleans and NULLs as they are, anything else (xids,
    timestamps) as text. A NULL stays ``None``: a physical slot has no database, an inactive
    one no ``active_pid``, a unix-socket client no address."""
    return [
        {
            k: (v if v is None or isinstance(v, int | float | str | bool) else str(v))
            for k, v in r.items()
        }
        for r in rows
    ]


# ---------------------------------------------------------------------- the relay's tick
class Maintenance:
    """Periodic work of the relay, called from its loop between drain rounds (``tick``).

    Everything is rate-limited here, so ``tick`` is cheap to call often: gauges every
    ``OUTBOX_GAUGE_INTERVAL`` (more rarely when the count is slow or the relay is behind),
    schema/drift and guard checks every ``OUTBOX_GUARD_INTERVAL``, a retention slice at most
    every rebalance interval while a run (one per ``OUTBOX_RETENTION_INTERVAL``, one relay at
    a time) is in progress.
    Connection errors propagate (the relay reconnects); other query errors are logged.
    """

    def __init__(self, settings: Settings, store: Store, state: RelayState) -> None:
        self.settings = settings
        self.store = store
        self.state = state
        self.retention = Retention(store, settings.retention, settings.retention_batch)
        self._conn_id: int | None = None
        self._run: RetentionRun | None = None
        self._next_guard = self._next_retention = self._next_slice = 0.0
        self._last_gauges = 0.0
        self._gauge_took = 0.0
        self._hold_retention = 0.0
        self._settling = True
        self._oldest_pending: float | None = None
        self._labels: dict[str, set[str]] = {"pending": set(), "dead": set()}
        self._warned: dict[str, float] = {}
        self._error_logged = 0.0
        # The drift check's definitions come from SQLAlchemy (a quarter of a second to load):
        # loaded on a thread from the first check on, beside the first rounds rather than in
        # front of them (or of the start-up). Until then the schema check is the revision
        # alone (as at connect).
        self._expected: Expected | None = None
        self._loading: threading.Thread | None = None

    def _load_expected(self) -> None:
        self._expected = expected_objects(self.store.schema, self.store.table)

    def tick(
        self, conn: psycopg.Connection[Any], shards: Sequence[int], caught_up: bool = True
    ) -> None:
        """``caught_up``: the relay's last round found no backlog. After a (re)connection the
        first counts, checks and retention slice wait for that, or for their interval: a
        relay starting on a backlog publishes first (counting a large backlog is a scan of
        the whole table, in parallel workers, ~0.2 s per 100k rows, and the drift check
        loads SQLAlchemy). While it is behind, the counts refresh
        :data:`BEHIND_GAUGE_FACTOR` times less often."""
        now = time.monotonic()
        if id(conn) != self._conn_id:  # a new connection: the retention lock went with the old
            self._conn_id = id(conn)
            self._run = None
            self._last_gauges, self._gauge_took = now, 0.0
            self._next_guard = now + self.settings.guard_interval
            self._hold_retention = now + self.settings.gauge_interval
            self._settling = True
        if self._settling and caught_up:
            self._settling = False
            self._last_gauges = -math.inf
            self._next_guard = self._hold_retention = 0.0
        interval = self.settings.gauge_interval * (1 if caught_up else BEHIND_GAUGE_FACTOR)
        try:
            if now >= self._last_gauges + max(interval, 20 * self._gauge_took):
                self._gauges(conn, shards, now)
            if now >= self._next_guard:
                self._next_guard = now + self.settings.guard_interval
                self._schema(conn)
                self._guard(conn)
            if self.retention.enabled and now >= self._hold_retention:
                self._retention(conn, now)
        except _CONNECTION_ERRORS:
            raise
        except psycopg.Error as exc:
            if now - self._error_logged > REPEAT_WARNING:
                self._error_logged = now
                log.warning("maintenance query failed: %s", str(exc).strip().splitlines()[0])

    # -- gauges
    def _gauges(self, conn: psycopg.Connection[Any], shards: Sequence[int], now: float) -> None:
        started = time.monotonic()
        pending = self.store.pending_gauge(conn, shards) if shards else []
        dead = self.store.dead_gauge(conn, shards) if shards else []
        took = time.monotonic() - started
        # never spend more than ~5% of the time counting, whatever the backlog
        self._last_gauges, self._gauge_took = now, took
        self._set(metrics.PENDING, "pending", {r["topic"]: r["pending"] for r in pending})
        self._set(metrics.DEAD_LETTERS, "dead", {r["topic"]: r["dead"] for r in dead})
        oldest = max((float(r["oldest_s"]) for r in pending), default=0.0)
        self._oldest_pending = oldest
        metrics.OLDEST_PENDING.set(oldest)
        metrics.GAUGES_REFRESHED.set(time.time())
        self.state.maintenance = {
            **self.state.maintenance,
            "pending": sum(int(r["pending"]) for r in pending),
            "dead_letters": sum(int(r["dead"]) for r in dead),
            "oldest_pending_s": round(oldest, 3),
            "gauge_query_s": round(took, 4),
        }

    def _set(self, gauge: Any, kind: str, values: dict[str, int]) -> None:
        for topic, value in values.items():
            gauge.labels(topic).set(value)
        for topic in self._labels[kind] - values.keys():
            gauge.remove(topic)
        self._labels[kind] = set(values)

    # -- schema drift
    def _schema(self, conn: psycopg.Connection[Any]) -> None:
        if self._expected is None:
            if self._loading is None:
                self._loading = threading.Thread(
                    target=self._load_expected, name="outbox-schema", daemon=True
                )
                self._loading.start()
            _revision, problems = revision_problems(self.store, conn)
            self._next_guard = min(self._next_guard, time.monotonic() + 1.0)  # drift soon
        else:
            _revision, problems = schema_problems(self.store, conn, self._expected)
        ok = not problems
        detail = "; ".join(problems) or None
        if ok and not self.state.schema:
            log.info("outbox schema is as expected again")
        elif not ok and (self.state.schema or detail != self.state.schema_detail):
            log.error("outbox schema problem (not ready): %s", detail)
        self.state.schema = ok
        self.state.schema_detail = detail
        metrics.SCHEMA_OK.set(1 if ok else 0)

    # -- guard
    def _guard(self, conn: psycopg.Connection[Any]) -> None:
        stats = self.store.table_stats(conn)
        dead_tuples = stats.get("dead_tuples")
        metrics.XMIN_HORIZON_AGE.set(self.store.horizon_age(conn))
        if dead_tuples is not None:
            metrics.TABLE_DEAD_TUPLES.set(int(dead_tuples))
        for part in ("heap", "index", "toast"):
            if stats.get(f"{part}_bytes") is not None:
                metrics.TABLE_BYTES.labels(part).set(int(stats[f"{part}_bytes"]))
        problems = guard_problems(
            self.store,
            conn,
            self.settings,
            oldest_pending_s=self._oldest_pending,
            dead_tuples=int(dead_tuples) if dead_tuples is not None else None,
        )
        now = time.monotonic()
        seen = {p.check for p in problems}
        for p in problems:
            last = self._warned.get(p.check)
            if last is None or now - last >= REPEAT_WARNING:
                self._warned[p.check] = now
                log.warning("postgres health: %s", p.message, extra={"check": p.check})
        for check in list(self._warned):
            if check not in seen:
                del self._warned[check]
                log.info("postgres health: %s is fine again", check, extra={"check": check})
        for check in CHECKS:
            metrics.GUARD_PROBLEM.labels(check).set(1 if check in seen else 0)
        self.state.warnings = [p.as_dict() for p in problems]

    # -- retention
    def _retention(self, conn: psycopg.Connection[Any], now: float) -> None:
        if self._run is None:
            if now < self._next_retention:
                return
            self._next_retention = now + self.settings.retention_interval
            if not self.store.try_retention_lock(conn):
                return  # another relay (or `outbox-relay retention run`) is at it
            self._run = self.retention.begin(conn)
            self._next_slice = 0.0
        if now < self._next_slice:
            return
        run = self.retention.run(conn, self._run, budget=SLICE_SECONDS)
        self._next_slice = time.monotonic() + self.settings.rebalance_interval
        if not run.done:
            return
        self.store.retention_unlock(conn)
        self._run = None
        summary = run.summary()
        self.state.maintenance = {**self.state.maintenance, "retention": summary}
        metrics.RETENTION_LAST_RUN.set(time.time())
        level = logging.INFO if run.deleted else logging.DEBUG
        log.log(
            level,
            "retention deleted %d sent rows older than %s in %d batches (%.2fs)",
            run.deleted,
            summary["cutoff"],
            run.batches,
            summary["seconds"],
            extra={"rows": run.deleted, "first_id": run.first_id, "last_id": run.last_id},
        )


__all__ = [
    "CHECKS",
    "Expected",
    "Maintenance",
    "Problem",
    "expected_objects",
    "guard_problems",
    "schema_problems",
]
