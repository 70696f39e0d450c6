"""Prometheus metrics of the relay (served by :mod:`outbox_relay.health` on ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

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
