"""Configuration: environment variables with the ``OUTBOX_`` prefix, overridable from the CLI.

Bad configuration fails at start with one line naming the setting (:class:`ConfigError`), never a
pydantic traceback.
"""

from __future__ import annotations

import os
import re
import socket
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class Settings(BaseSettings):
    """Every setting of the producer helper and the relay.

    Field ``x`` is read from ``OUTBOX_X``; the schema name is ``OUTBOX_SCHEMA``.
    """

    model_config = SettingsConfigDict(
        env_prefix="OUTBOX_", extra="ignore", populate_by_name=True, validate_default=True
    )

    # -- where the outbox lives
    database_url: str | None = None
    db_schema: str = Field(
        default="public", validation_alias=AliasChoices("OUTBOX_SCHEMA", "db_schema")
    )
    table: str = "outbox"
    shards: int = Field(default=16, ge=1, le=1024)

    # -- producer side
    max_payload_bytes: int = Field(default=1024 * 1024, ge=1)
    #: topics (comma-separated glob patterns, ``*`` for all) whose keyed messages get a per-key
    #: sequence number in commit order (header ``outbox-seq``); needs schema revision 0002
    sequence_topics: str = ""

    # -- relay
    sink: Literal["kafka", "webhook"] = "kafka"
    wakeup: Literal["notify", "poll"] = "notify"
    leases: bool = True
    #: rows per drain round; default 4000 for Kafka, 1000 when webhooks are involved (a round
    #: is marked once all its deliveries are through): see :attr:`round_rows`
    batch_size: int | None = Field(default=None, ge=1, le=100_000)
    poll_interval: float = Field(default=2.0, gt=0, le=3600)
    heartbeat_interval: float = Field(default=15.0, gt=0)
    rebalance_interval: float = Field(default=2.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    retry_backoff_base: float = Field(default=0.5, gt=0)
    retry_backoff_max: float = Field(default=300.0, gt=0)
    strict_order: bool = False
    #: keep delivered rows (``sent_at`` set) for ``retention`` so they can be replayed; false
    #: (the default) deletes each row in the statement that records its delivery
    keep_sent: bool = False
    #: > 0 (default 30): fetch cursors, with a full scan every this many seconds as a safety
    #: net (cursors.py; see README). 0: every fetch reads each shard from its first pending row
    rescan_interval: float = Field(default=30.0, ge=0, le=3600)
    shutdown_timeout: float = Field(default=30.0, gt=0)
    http_port: int = Field(default=8080, ge=0, le=65535)
    http_host: str = "0.0.0.0"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    relay_name: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    lease_namespace: int | None = Field(default=None, ge=1, le=2**31 - 1)

    # -- Kafka sink
    kafka_bootstrap_servers: str | None = None
    kafka_properties: dict[str, Any] = Field(default_factory=dict)
    kafka_topic_prefix: str = ""
    kafka_delivery_timeout: float = Field(default=30.0, gt=0)
    #: exactly-once into Kafka: one transactional producer per owned shard, each batch committed
    #: together with a progress record naming its outbox ids (docs/guarantees.md)
    kafka_exactly_once: bool = False
    #: ``transactional.id`` of shard n is ``<prefix>-<n>``;
    #: default ``outbox-relay.<schema>.<table>``
    kafka_transactional_id_prefix: str | None = Field(default=None, min_length=1, max_length=200)
    #: compacted topic of the progress records;
    #: default ``<transactional id prefix>.outbox-progress``
    kafka_progress_topic: str | None = Field(default=None, min_length=1, max_length=249)

    # -- webhook sink (docs/webhooks.md); a routes file mixes Kafka and webhook endpoints
    webhook_url: str | None = None
    #: one ``whsec_...`` secret, or several separated by spaces or commas (rotation)
    webhook_secret: SecretStr | None = None
    webhook_timeout: float = Field(default=15.0, gt=0, le=300)
    webhook_concurrency: int = Field(default=16, ge=1, le=256)
    webhook_headers: dict[str, str] = Field(default_factory=dict)
    #: allow endpoints on loopback/private/link-local addresses (SSRF guard opt-out)
    webhook_allow_private: bool = False
    webhook_breaker_failures: int = Field(default=5, ge=1)
    webhook_breaker_cooldown: float = Field(default=30.0, gt=0)
    routes_file: Path | None = None

    # -- operations (docs/operations.md); durations take 90, 90s, 15m, 24h or 7d
    #: log lines as JSON (``json``), readable (``text``), or JSON unless stderr is a TTY (``auto``)
    log_format: Literal["auto", "json", "text"] = "auto"
    #: with ``keep_sent``: sent rows older than this are deleted in small batches; 0 keeps them
    #: forever. Also how long the delivery counters of ``status`` are kept (at least an hour)
    retention: float = Field(default=86_400.0, ge=0)
    #: rows per retention DELETE statement (each statement is its own short transaction)
    retention_batch: int = Field(default=5000, ge=1, le=100_000)
    #: seconds between retention runs in the relay (one relay at a time, by advisory lock)
    retention_interval: float = Field(default=60.0, gt=0)
    #: seconds between refreshes of the pending / dead-letter / oldest-pending gauges (at least;
    #: the relay backs off further when the count query is slow)
    gauge_interval: float = Field(default=5.0, gt=0)
    #: seconds between the schema/drift check and the Postgres-health guard's checks
    guard_interval: float = Field(default=30.0, gt=0)
    #: warn when a transaction (or prepared transaction) holding back the xmin horizon is older
    guard_xact_age: float = Field(default=300.0, gt=0)
    #: warn when a replication slot's xmin is older than this many transactions (or inactive)
    guard_slot_xmin_age: int = Field(default=10_000_000, ge=1)
    #: warn when the outbox table has more dead tuples than this
    guard_dead_tuples: int = Field(default=1_000_000, ge=1)
    #: warn when the oldest pending message is older than this; 0 disables
    pending_slo: float = Field(default=300.0, ge=0)

    @field_validator("db_schema", "table")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENT.match(value):
            raise ValueError("must be a plain SQL identifier (letters, digits, _; max 41 chars)")
        return value

    @field_validator(
        "retention",
        "retention_interval",
        "gauge_interval",
        "guard_interval",
        "guard_xact_age",
        "pending_slo",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for part in value.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected host:port[,host:port...], got {value!r}")
        return value

    @field_validator("kafka_progress_topic")
    @classmethod
    def _topic_name(cls, value: str | None) -> str | None:
        if value is not None and not _TOPIC.match(value):
            raise ValueError("a Kafka topic name is letters, digits, '.', '_' and '-' only")
        return value

    def sequenced(self, topic: str) -> bool:
        """Whether messages of ``topic`` get a per-key sequence (``OUTBOX_SEQUENCE_TOPICS``)."""
        from fnmatch import fnmatchcase

        patterns = [p.strip() for p in self.sequence_topics.split(",") if p.strip()]
        return any(fnmatchcase(topic, p) for p in patterns)

    # -- derived names
    @property
    def channel(self) -> str:
        """The NOTIFY channel the trigger signals on."""
        return f"outbox_relay.{self.db_schema}.{self.table}"

    @property
    def namespace(self) -> int:
        """First key of the shard advisory locks: stable per (schema, table)."""
        if self.lease_namespace is not None:
            return self.lease_namespace
        return zlib.crc32(f"{self.db_schema}.{self.table}".encode()) & 0x7FFFFFFF

    @property
    def transactional_id_prefix(self) -> str:
        """Prefix of the per-shard ``transactional.id`` (exactly-once mode)."""
        return self.kafka_transactional_id_prefix or f"outbox-relay.{self.db_schema}.{self.table}"

    @property
    def progress_topic(self) -> str:
        """The compacted topic holding each shard's last committed batch (exactly-once mode)."""
        return self.kafka_progress_topic or f"{self.transactional_id_prefix}.outbox-progress"

    @property
    def round_rows(self) -> int:
        """Rows per drain round: ``batch_size``, or the sink's default. Kafka gets larger rounds
        (measured: 4000 drained ~40% faster than 1000); a webhook round waits for its slowest
        endpoint, so webhooks and routes files keep 1000."""
        if self.batch_size is not None:
            return self.batch_size
        return 4000 if self.sink == "kafka" and self.routes_file is None else 1000

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError("OUTBOX_DATABASE_URL is not set (e.g. postgresql://user:pw@host/db)")
        return self.database_url


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90``, ``90s``, ``15m``, ``24h``, ``7d``, ``250ms`` (``0`` = off)."""
    match = _DURATION.match(text.lower())
    if not match:
        raise ValueError(f"expected a duration such as 90s, 15m, 24h or 7d, got {text!r}")
    return float(match.group(1)) * _UNIT[match.group(2) or "s"]


def _setting_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    if field.startswith("OUTBOX_"):
        return field
    if field == "db_schema":
        return "OUTBOX_SCHEMA"
    return f"OUTBOX_{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, apply non-None ``overrides``; one-line errors."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(
            f"invalid setting {_setting_name(first['loc'])}: {first['msg']}"
        ) from None


@lru_cache(maxsize=1)
def producer_settings() -> Settings:
    """Settings the producer helper reads once per process (schema, table, payload limit)."""
    return load_settings()


def conninfo(url: str) -> str:
    """Turn a SQLAlchemy URL (``postgresql+psycopg://``) into a libpq connection string."""
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql://", url)


#: libpq options of the relay's long-lived connections: a server that vanished without a FIN/RST
#: (host crash, network cut, blackholed packets) is noticed in ~10 s instead of the kernel's
#: ~15 minutes, so the relay reconnects. A URL that sets any of these keeps its own value.
#: (The lease connection also asks the *server* to probe it: see Store.harden_lease_session.)
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


def relay_conninfo(url: str) -> str:
    """``conninfo(url)`` plus :data:`KEEPALIVES` where the URL does not set them."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    base = conninfo(url)
    given = conninfo_to_dict(base)
    extra = {k: v for k, v in KEEPALIVES.items() if k not in given}
    return make_conninfo(base, **extra)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
