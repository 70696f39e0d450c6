"""The routes file (``OUTBOX_ROUTES_FILE``): which topic goes to Kafka, which to which webhook.

TOML, validated completely at start; any problem is one :class:`ConfigError` line naming the file
and the place::

    # routes are tried in order; the first whose pattern matches a row's topic wins
    [[route]]
    topics = ["orders.*", "invoices.*"]   # fnmatch globs, case-sensitive ("*" also matches ".")
    webhook = "billing"                   # a [webhook.<name>] below

    [[route]]
    topics = "audit.*"
    kafka = "audit-events"                # this Kafka topic (OUTBOX_KAFKA_TOPIC_PREFIX applies)

    [[route]]
    topics = "*"
    kafka = true                          # Kafka, the row's own topic

    [webhook.billing]
    url = "https://billing.example.com/hooks/outbox"
    secrets_env = "BILLING_WEBHOOK_SECRET"   # env var(s) holding whsec_... (or: secrets = [...])
    timeout = 5                              # seconds, default OUTBOX_WEBHOOK_TIMEOUT
    concurrency = 8                          # default OUTBOX_WEBHOOK_CONCURRENCY
    headers = { "X-Tenant" = "acme" }

A topic no route matches is not dropped: its rows fail with "no route matches topic ..." and are
retried, then dead-lettered, like any failure.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from .errors import ConfigError
from .settings import Settings
from .sinks.webhook import EndpointConfig, endpoint_config, split_secrets

log = logging.getLogger(__name__)

_ROUTE_KEYS = {"topics", "topic", "webhook", "kafka"}
_WEBHOOK_KEYS = {"url", "secrets", "secrets_env", "timeout", "concurrency", "headers"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True)
class Route:
    """One ``[[route]]``: ``webhook`` (an endpoint name) or Kafka (``kafka_topic`` or the row's)."""

    number: int
    patterns: tuple[str, ...]
    webhook: str | None = None
    kafka_topic: str | None = None

    @property
    def kafka(self) -> bool:
        return self.webhook is None

    @property
    def destination(self) -> str:
        """``kafka`` or ``webhook:<name>``: rows of one key keep their order per destination."""
        return "kafka" if self.webhook is None else f"webhook:{self.webhook}"

    def matches(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, p) for p in self.patterns)

    def describe(self) -> str:
        target = (
            f"webhook {self.webhook!r}"
            if self.webhook is not None
            else f"Kafka topic {self.kafka_topic!r}"
            if self.kafka_topic
            else "Kafka"
        )
        return f"route #{self.number} ({', '.join(self.patterns)} -> {target})"


@dataclass
class Routes:
    path: Path
    routes: tuple[Route, ...]
    webhooks: dict[str, EndpointConfig]
    _cache: dict[str, Route | None] = field(default_factory=dict, repr=False)

    def match(self, topic: str) -> Route | None:
        """The first route whose pattern matches ``topic`` (cached per topic)."""
        try:
            return self._cache[topic]
        except KeyError:
            pass
        found = next((r for r in self.routes if r.matches(topic)), None)
        if len(self._cache) < 100_000:
            self._cache[topic] = found
        return found

    @property
    def uses_kafka(self) -> bool:
        return any(r.kafka for r in self.routes)


def load_routes(path: Path | str, settings: Settings) -> Routes:
    """Read and validate a routes file; :class:`ConfigError` with one line on any problem."""
    path = Path(path)
    where = f"OUTBOX_ROUTES_FILE {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    return parse_routes(doc, settings, path)


def parse_routes(doc: Mapping[str, Any], settings: Settings, path: Path) -> Routes:
    where = f"OUTBOX_ROUTES_FILE {path}"

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    unknown = set(doc) - {"route", "webhook"}
    if unknown:
        raise fail(
            f"unknown top-level key {sorted(unknown)[0]!r} (expected [[route]] and [webhook.NAME])"
        )
    raw_hooks = doc.get("webhook", {})
    if not isinstance(raw_hooks, dict):
        raise fail("'webhook' must be tables: [webhook.NAME]")
    webhooks: dict[str, EndpointConfig] = {}
    for name, spec in raw_hooks.items():
        webhooks[name] = _webhook(name, spec, settings, where)

    raw_routes = doc.get("route")
    if raw_routes is None:
        raise fail("no [[route]] defined")
    if not isinstance(raw_routes, list) or not all(isinstance(r, dict) for r in raw_routes):
        raise fail("'route' must be an array of tables: [[route]]")
    if not raw_routes:
        raise fail("no [[route]] defined")
    routes = tuple(_route(n, spec, webhooks, where) for n, spec in enumerate(raw_routes, 1))
    used = {r.webhook for r in routes}
    for name in webhooks:
        if name not in used:
            log.warning("%s: webhook %r is not used by any route", where, name)
    return Routes(path, routes, webhooks)


def _strings(value: object, what: str, fail: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise fail(f"{what} must be a string or a non-empty list of strings")
    return list(items)


def _route(
    n: int, spec: dict[str, Any], webhooks: Mapping[str, EndpointConfig], where: str
) -> Route:
    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{where}: route #{n}: {msg}")

    unknown = set(spec) - _ROUTE_KEYS
    if unknown:
        raise fail(f"unknown key {sorted(unknown)[0]!r} (allowed: topics, webhook, kafka)")
    if "topics" in spec and "topic" in spec:
        raise fail("set 'topics' or 'topic', not both")
    if "topics" not in spec and "topic" not in spec:
        raise fail("no 'topics' (glob patterns of the topics it takes)")
    patterns = _strings(spec.get("topics", spec.get("topic")), "'topics'", fail)
    if any(not p.strip() for p in patterns):
        raise fail("an empty topic pattern")
    has_hook, has_kafka = "webhook" in spec, "kafka" in spec
    if has_hook == has_kafka:
        raise fail("set exactly one of 'webhook = \"NAME\"' and 'kafka = true | \"TOPIC\"'")
    if has_hook:
        name = spec["webhook"]
        if not isinstance(name, str):
            raise fail("'webhook' must be the name of a [webhook.NAME] table")
        if name not in webhooks:
            known = ", ".join(sorted(webhooks)) or "none"
            raise fail(f"unknown webhook {name!r} (defined: {known})")
        return Route(n, tuple(patterns), webhook=name)
    kafka = spec["kafka"]
    if kafka is True:
        return Route(n, tuple(patterns))
    if isinstance(kafka, str) and _KAFKA_TOPIC.match(kafka):
        return Route(n, tuple(patterns), kafka_topic=kafka)
    raise fail("'kafka' must be true (the row's topic) or a Kafka topic name ([A-Za-z0-9._-])")


def _webhook(name: str, spec: object, settings: Settings, where: str) -> EndpointConfig:
    place = f"{where}: webhook {name!r}"

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{place}: {msg}")

    if not _NAME.match(name):
        raise fail("names are 1-64 of A-Z a-z 0-9 _ . -")
    if not isinstance(spec, dict):
        raise fail("must be a table [webhook.NAME]")
    unknown = set(spec) - _WEBHOOK_KEYS
    if unknown:
        allowed = ", ".join(sorted(_WEBHOOK_KEYS))
        raise fail(f"unknown key {sorted(unknown)[0]!r} (allowed: {allowed})")
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise fail("'url' is missing")
    secrets: list[str] = []
    if "secrets" in spec:
        for s in _strings(spec["secrets"], "'secrets'", fail):
            secrets.extend(split_secrets(s))
    if "secrets_env" in spec:
        for var in _strings(spec["secrets_env"], "'secrets_env'", fail):
            value = os.environ.get(var)
            if not value or not value.strip():
                raise fail(f"environment variable {var} (secrets_env) is not set")
            secrets.extend(split_secrets(value))
    if not secrets:
        raise fail("no signing secret: set 'secrets_env' (or 'secrets') to whsec_... value(s)")
    headers = spec.get("headers", {})
    if not isinstance(headers, dict):
        raise fail("'headers' must be a table of strings")
    return endpoint_config(
        name,
        url,
        [SecretStr(s) for s in secrets],
        where=place,
        timeout=spec.get("timeout", settings.webhook_timeout),
        concurrency=spec.get("concurrency", settings.webhook_concurrency),
        headers=headers,
    )


__all__ = ["Route", "Routes", "load_routes", "parse_routes"]
