"""RouterSink: one relay, several sinks. Splits a batch by route, publishes the parts
concurrently (Kafka in a thread, every webhook endpoint on its own threads), and returns the
outcomes in row order.

Order per key holds across destinations too: a key's rows in a batch are taken up to the first
row that goes elsewhere; that row and the key's later rows are skipped (left pending) and come
back, in order, in the next round. A row whose topic no route matches fails with a clear error,
so it is retried and finally dead-lettered, never dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError
from ..routes import Route, Routes, load_routes
from ..settings import Settings
from ..store import OutboxRow
from .base import Outcome, Sink
from .webhook import WebhookSink, sink_options

log = logging.getLogger(__name__)


class RouterSink:
    name = "router"

    def __init__(self, routes: Routes, kafka: Sink | None, webhooks: WebhookSink | None) -> None:
        if routes.uses_kafka and kafka is None:
            raise ConfigError(f"OUTBOX_ROUTES_FILE {routes.path}: a route needs Kafka")
        if routes.webhooks and webhooks is None:
            raise ConfigError(f"OUTBOX_ROUTES_FILE {routes.path}: webhooks need a WebhookSink")
        self.routes = routes
        self.kafka = kafka
        self.webhooks = webhooks
        self._kafka_thread = ThreadPoolExecutor(1, thread_name_prefix="router-kafka")
        self._unrouted_logged: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RouterSink:
        assert settings.routes_file is not None
        if settings.webhook_url:
            raise ConfigError(
                "set OUTBOX_ROUTES_FILE or OUTBOX_WEBHOOK_URL, not both (name the endpoint in "
                "the routes file)"
            )
        routes = load_routes(settings.routes_file, settings)
        kafka: Sink | None = None
        if routes.uses_kafka:
            from .kafka import KafkaSink

            kafka = KafkaSink(settings)
        webhooks = (
            WebhookSink(list(routes.webhooks.values()), **sink_options(settings))
            if routes.webhooks
            else None
        )
        log.info(
            "routes from %s: %s",
            routes.path,
            "; ".join(r.describe() for r in routes.routes),
        )
        return cls(routes, kafka, webhooks)

    def check(self) -> None:
        if self.kafka is not None:
            self.kafka.check()
        if self.webhooks is not None:
            self.webhooks.check()

    def status(self) -> list[dict[str, object]]:
        return self.webhooks.status() if self.webhooks is not None else []

    def publish(self, rows: Sequence[OutboxRow], timeout: float) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(rows)
        kafka_idx: list[int] = []
        kafka_rows: list[OutboxRow] = []
        hook_idx: list[int] = []
        hook_rows: list[OutboxRow] = []
        hook_names: list[str] = []
        first_dest: dict[str, str] = {}
        held: set[str] = set()  # keys whose later rows wait for the next round
        for i, row in enumerate(rows):
            key = row.key
            if key is not None and key in held:
                outcomes[i] = Outcome.skip()
                continue
            route = self.routes.match(row.topic)
            if route is None:
                outcomes[i] = self._unrouted(row)
                if key is not None:
                    held.add(key)
                continue
            if key is not None:
                dest = first_dest.setdefault(key, route.destination)
                if dest != route.destination:
                    held.add(key)
                    outcomes[i] = Outcome.skip()
                    continue
            if route.webhook is None:
                kafka_idx.append(i)
                kafka_rows.append(_retarget(row, route))
            else:
                hook_idx.append(i)
                hook_rows.append(row)
                hook_names.append(route.webhook)

        kafka_future: Future[list[Outcome]] | None = None
        if kafka_rows:
            assert self.kafka is not None
            kafka_future = self._kafka_thread.submit(self.kafka.publish, kafka_rows, timeout)
        if hook_rows:
            assert self.webhooks is not None
            for i, o in zip(
                hook_idx, self.webhooks.publish_to(hook_rows, hook_names, timeout), strict=True
            ):
                outcomes[i] = o
        if kafka_future is not None:
            for i, o in zip(kafka_idx, kafka_future.result(), strict=True):  # re-raises fatal
                outcomes[i] = o
        return [o if o is not None else Outcome.skip() for o in outcomes]

    def _unrouted(self, row: OutboxRow) -> Outcome:
        now = time.monotonic()
        if now - self._unrouted_logged.get(row.topic, -1e9) > 60:
            self._unrouted_logged[row.topic] = now
            log.error(
                "no route in %s matches topic %r (outbox id %d): its rows fail and will be "
                "dead-lettered; add a route",
                self.routes.path,
                row.topic,
                row.id,
            )
        return Outcome.fail(f"no route in OUTBOX_ROUTES_FILE matches topic {row.topic!r}")

    def close(self, timeout: float) -> None:
        for sink in (self.kafka, self.webhooks):
            if sink is not None:
                try:
                    sink.close(timeout)
                except Exception as exc:  # noqa: BLE001 - close the others anyway
                    log.warning("closing %s failed: %s", sink.name, exc)
        self._kafka_thread.shutdown(wait=False)


def _retarget(row: OutboxRow, route: Route) -> OutboxRow:
    if route.kafka_topic is None or route.kafka_topic == row.topic:
        return row
    return row._replace(topic=route.kafka_topic)


def make_sink(settings: Settings) -> Any:
    """The sink ``outbox-relay run`` uses, from settings."""
    if settings.kafka_exactly_once:
        if settings.routes_file is not None or settings.sink != "kafka":
            raise ConfigError(
                "OUTBOX_KAFKA_EXACTLY_ONCE=true works with the Kafka sink only (OUTBOX_SINK=kafka, "
                "no OUTBOX_ROUTES_FILE)"
            )
        from .kafka_eos import KafkaExactlyOnceSink

        return KafkaExactlyOnceSink(settings)
    if settings.routes_file is not None:
        return RouterSink.from_settings(settings)
    if settings.sink == "webhook":
        return WebhookSink.from_settings(settings)
    from .kafka import KafkaSink

    return KafkaSink(settings)


__all__ = ["RouterSink", "make_sink"]
