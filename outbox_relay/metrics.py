"""Prometheus metrics of the relay (served by :mod:`outbox_relay.health` on ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import __version__
from .schema_version import SCHEMA_REVISION

REGISTRY = CollectorRegistry(auto_describe=True)

BUILD_INFO = Gauge(
    "outbox_relay_build_info",
    "Always 1: the relay's version and the schema revision it expects",
    ["version", "schema_revision"],
    registry=REGISTRY,
)
BUILD_INFO.labels(__version__, SCHEMA_REVISION).set(1)

PUBLISHED = Counter(
    "outbox_messages_published",
    "Messages confirmed by the sink and marked sent",
    ["topic", "sink"],
    registry=REGISTRY,
)
FAILED = Counter(
    "outbox_messages_failed",
    "Delivery attempts that failed (will be retried)",
    ["topic", "sink"],
    registry=REGISTRY,
)
DEAD_LETTERED = Counter(
    "outbox_messages_dead_lettered",
    "Messages moved to dead letters after max attempts",
    ["topic", "sink"],
    registry=REGISTRY,
)
FENCED = Counter(
    "outbox_marks_fenced",
    "Delivered rows not marked because the shard lease moved on",
    registry=REGISTRY,
)
REFETCHES = Counter(
    "outbox_refetches",
    "Fetches run again because a transaction that may hold rows below a fetch cursor ended"
    " while the fetch ran",
    registry=REGISTRY,
)
READ_AHEAD = Counter(
    "outbox_read_ahead_batches",
    "Batches read while the batch before them was being acknowledged (a backlog): `used`, or"
    " `voided` because a row of that batch was not delivered",
    ["outcome"],
    registry=REGISTRY,
)
LAG = Histogram(
    "outbox_end_to_end_lag_seconds",
    "Row created -> sink confirmed",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "outbox_batch_size",
    "Rows per drain round",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "outbox_batch_duration_seconds",
    "Fetch + publish + mark time of a drain round",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
SHARDS_OWNED = Gauge(
    "outbox_shards_owned", "Shards this relay holds the lease of", registry=REGISTRY
)
RECONNECTS = Counter(
    "outbox_reconnects",
    "Database reconnects of the relay",
    registry=REGISTRY,
)
NOTIFICATIONS = Counter(
    "outbox_notifications",
    "Wake-ups by NOTIFY",
    registry=REGISTRY,
)
POLLS_WITH_WORK = Counter(
    "outbox_polls_with_work",
    "Timer wake-ups (no NOTIFY) that found rows",
    registry=REGISTRY,
)
KAFKA_TRANSACTIONS = Counter(
    "outbox_kafka_transactions",
    "Kafka transactions of the exactly-once mode by result: committed, aborted (rows retried), "
    "lost (fenced, or commit outcome unknown: the shard is given up and recovered)",
    ["result"],
    registry=REGISTRY,
)

# -- operations (docs/operations.md): refreshed by the relay's maintenance tick (guard.py)
LISTENER_RECONNECTS = Counter(
    "outbox_listener_reconnects",
    "LISTEN connection re-opened after a failure (deaf heartbeat or lost connection)",
    registry=REGISTRY,
)
PENDING = Gauge(
    "outbox_pending",
    "Pending rows (not sent, not dead) in the shards this relay owns; sum over relays",
    ["topic"],
    registry=REGISTRY,
)
DEAD_LETTERS = Gauge(
    "outbox_dead_letters",
    "Dead letters in the shards this relay owns; sum over relays",
    ["topic"],
    registry=REGISTRY,
)
OLDEST_PENDING = Gauge(
    "outbox_oldest_pending_age_seconds",
    "Age of the oldest pending row in the shards this relay owns (0 when none); max over relays",
    registry=REGISTRY,
)
GAUGES_REFRESHED = Gauge(
    "outbox_gauges_refreshed_timestamp_seconds",
    "When the pending/dead-letter gauges were last refreshed (unix time)",
    registry=REGISTRY,
)
RETENTION_DELETED = Counter(
    "outbox_retention_deleted",
    "Sent rows deleted by retention",
    registry=REGISTRY,
)
RETENTION_BATCH_SECONDS = Histogram(
    "outbox_retention_batch_duration_seconds",
    "Duration of one retention DELETE statement (its lock time)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
RETENTION_LAST_RUN = Gauge(
    "outbox_retention_last_run_timestamp_seconds",
    "When this relay last finished a retention run (unix time)",
    registry=REGISTRY,
)
SCHEMA_OK = Gauge(
    "outbox_schema_ok",
    "1 when the outbox is at the package's revision and its indexes/trigger are as expected",
    registry=REGISTRY,
)
GUARD_PROBLEM = Gauge(
    "outbox_guard_problem",
    "1 while the Postgres-health guard sees the problem (xmin_horizon, prepared_xact, "
    "replication_slot, dead_tuples, pending_slo)",
    ["check"],
    registry=REGISTRY,
)
XMIN_HORIZON_AGE = Gauge(
    "outbox_xmin_horizon_age_seconds",
    "Age of the oldest transaction in this database holding back the xmin horizon",
    registry=REGISTRY,
)
TABLE_DEAD_TUPLES = Gauge(
    "outbox_table_dead_tuples",
    "Dead tuples of the outbox table (pg_stat_user_tables)",
    registry=REGISTRY,
)
TABLE_BYTES = Gauge(
    "outbox_table_bytes",
    "Size of the outbox table by part (heap, indexes, toast)",
    ["part"],
    registry=REGISTRY,
)
