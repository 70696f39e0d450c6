"""Kafka sink on confluent-kafka (librdkafka): idempotent producer, Java-compatible partitioner."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from ..errors import ConfigError, FatalSinkError, SinkUnavailable
from ..settings import Settings
from ..store import OutboxRow
from .base import Outcome

log = logging.getLogger(__name__)

#: Producer settings chosen for an outbox: no loss, no reordering, Java-compatible partitions.
#: ``linger.ms`` hardly matters here: the relay flushes every batch, and a flush sends at once.
DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "partitioner": "murmur2_random",
    "compression.type": "lz4",
    "linger.ms": 5,
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 1_048_576,
}

#: What the relay adds to every message, besides the row's own headers.
HEADER_IDEMPOTENCY_KEY = "idempotency-key"
HEADER_OUTBOX_ID = "outbox-id"
HEADER_CONTENT_TYPE = "content-type"
HEADER_SEQ = "outbox-seq"


def producer_config(settings: Settings) -> dict[str, Any]:
    """The librdkafka configuration: defaults, then the user's pass-through properties."""
    if not settings.kafka_bootstrap_servers:
        raise ConfigError("OUTBOX_KAFKA_BOOTSTRAP_SERVERS is not set (host:port of a Kafka broker)")
    config: dict[str, Any] = dict(DEFAULTS)
    config["bootstrap.servers"] = settings.kafka_bootstrap_servers
    config["message.timeout.ms"] = int(settings.kafka_delivery_timeout * 1000)
    config["client.id"] = f"outbox-relay:{settings.relay_name}"
    config.update(settings.kafka_properties)
    return config


def message_headers(row: OutboxRow) -> list[tuple[str, str | bytes | None]]:
    """The Kafka headers of ``row``'s message: its own, then the relay's."""
    headers: list[tuple[str, str | bytes | None]] = [
        (k, v.encode()) for k, v in row.headers.items()
    ]
    headers.append((HEADER_IDEMPOTENCY_KEY, row.idempotency_key.encode()))
    headers.append((HEADER_OUTBOX_ID, str(row.id).encode()))
    headers.append((HEADER_CONTENT_TYPE, row.content_type.encode()))
    if row.seq is not None:
        headers.append((HEADER_SEQ, str(row.seq).encode()))
    return headers


class KafkaSink:
    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._prefix = settings.kafka_topic_prefix
        self._fatal: KafkaError | None = None
        config = producer_config(settings)
        config["error_cb"] = self._on_error
        config["logger"] = logging.getLogger("outbox_relay.librdkafka")
        try:
            self._producer = Producer(config)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid Kafka configuration: {describe(exc)}") from None

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
            log.error("kafka producer fatal error: %s", err.str())
        else:
            log.debug("kafka client error: %s", err.str())

    def check(self, timeout: float = 10.0) -> None:
        check_reachable(self._producer, self._settings.kafka_bootstrap_servers, timeout)

    def publish(self, rows: Sequence[OutboxRow], timeout: float) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(rows)
        failed_keys: set[str] = set()
        produce = self._producer.produce
        poll = self._producer.poll

        def report(index: int) -> Any:
            def on_delivery(err: KafkaError | None, _msg: Message) -> None:
                if err is None:
                    outcomes[index] = Outcome.ok()
                else:
                    outcomes[index] = Outcome.fail(f"kafka: {err.str()} ({err.name()})")
                    if err.fatal():
                        self._fatal = err

            return on_delivery

        for i, row in enumerate(rows):
            if row.key is not None and row.key in failed_keys:
                outcomes[i] = Outcome.skip()
                continue
            headers = message_headers(row)
            while True:
                try:
                    produce(
                        self._prefix + row.topic,
                        row.payload,
                        row.key,
                        headers=headers,
                        on_delivery=report(i),
                    )
                    break
                except BufferError:
                    poll(0.05)
                except KafkaException as exc:
                    outcomes[i] = Outcome.fail(f"kafka: {describe(exc)}")
                    if row.key is not None:
                        failed_keys.add(row.key)
                    break
        self._wait(outcomes, timeout)
        if self._fatal is not None:
            raise FatalSinkError(f"kafka producer fatal error: {self._fatal.str()}")
        return [
            o if o is not None else Outcome.fail("kafka: delivery not confirmed in time")
            for o in outcomes
        ]

    def _wait(self, outcomes: list[Outcome | None], timeout: float) -> None:
        """Until every message of *this* batch has its delivery report (several drain workers
        may publish at once: the producer's queue as a whole need not run empty)."""
        deadline = time.monotonic() + timeout
        pending = [i for i, o in enumerate(outcomes) if o is None]
        while pending:
            # flush sends at once (no linger) and serves delivery callbacks
            left = self._producer.flush(min(0.05, max(0.0, deadline - time.monotonic())))
            pending = [i for i in pending if outcomes[i] is None]
            if left == 0 or time.monotonic() >= deadline or self._fatal is not None:
                return

    def close(self, timeout: float) -> None:
        self._producer.flush(timeout)


def check_reachable(client: Any, servers: str | None, timeout: float) -> None:
    """Raise :class:`SinkUnavailable` unless ``client`` (a producer or an admin client) gets
    the cluster's metadata within ``timeout`` seconds."""
    try:
        client.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise SinkUnavailable(f"cannot reach Kafka at {servers}: {describe(exc)}") from None


def describe(exc: BaseException) -> str:
    """One line for a Kafka exception: librdkafka's text and the error's name."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        err = exc.args[0]
        return f"{err.str()} ({err.name()})"
    return str(exc)
