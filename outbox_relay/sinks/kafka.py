"""Kafka sink on confluent-kafka (librdkafka): idempotent producer, Java-compatible partitioner."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
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
    """The Kafka headers of ``row``'s message: its own, then the relay's (librdkafka encodes
    ``str`` values as UTF-8 itself, cheaper than ``.encode()`` here)."""
    headers: list[tuple[str, str | bytes | None]] = (
        [] if row.headers_json is None else list(row.headers.items())
    )
    headers.append((HEADER_IDEMPOTENCY_KEY, row.idempotency_key))
    headers.append((HEADER_OUTBOX_ID, str(row.id)))
    headers.append((HEADER_CONTENT_TYPE, row.content_type))
    if row.seq is not None:
        headers.append((HEADER_SEQ, str(row.seq)))
    return headers


_Identity = tuple[str | None, bytes | None, bytes | None]  # a message's topic, key and value


class DeliveryReports:
    """The delivery reports of one batch, through one callback for all its messages.

    A closure per message (to know its row) cost ~1.4 µs of the relay's CPU per message, a
    fifth of its produce loop. So successes are only counted (the at-least-once sink asks for
    reports of refused messages only) and a failure keeps what identifies its message --
    topic, key and value (a report carries no headers). Each batch
    has its own instance: a late report of an earlier batch cannot be counted in this one.
    """

    __slots__ = ("_errors", "delivered", "failures", "fatal")

    def __init__(self) -> None:
        self.delivered = 0
        self.failures: list[tuple[KafkaError, _Identity]] = []
        self.fatal: KafkaError | None = None
        self._errors: dict[_Identity, KafkaError] | None = None

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failures.append((err, (msg.topic(), msg.key(), msg.value())))
            if err.fatal():
                self.fatal = err

    @property
    def received(self) -> int:
        return self.delivered + len(self.failures)

    def error_for(self, row: OutboxRow, prefix: str) -> KafkaError | None:
        """The error of a failed report whose message is ``row``'s (topic, key and value), if
        any. Identical messages of one key share it: when only some of them were refused, all
        are taken as refused (retried: a duplicate of an identical message, never a loss)."""
        if not self.failures:
            return None
        if self._errors is None:
            self._errors = {}
            for err, ident in self.failures:
                self._errors.setdefault(ident, err)  # the first: a refusal before a purge
        key = None if row.key is None else row.key.encode()
        return self._errors.get((prefix + row.topic, key, bytes(row.payload)))

    def outcomes(
        self, rows: Sequence[OutboxRow], queued: Sequence[int], prefix: str, complete: bool
    ) -> dict[int, Outcome]:
        """The outcome of each queued row (indexes ``queued`` of ``rows``): a row whose message
        was refused fails; the others are delivered if every message of the batch has left the
        producer (``complete``), else none can be known delivered and all are retried."""
        if not self.failures and complete:
            return dict.fromkeys(queued, _OK)
        otherwise = _OK if complete else Outcome.fail("kafka: delivery not confirmed in time")
        result: dict[int, Outcome] = {}
        for i in queued:
            err = self.error_for(rows[i], prefix)
            result[i] = otherwise if err is None else Outcome.fail(f"kafka: {describe(err)}")
        return result


_OK = Outcome.ok()


def produce_when_room(
    producer: Producer,
    topic: str,
    value: bytes,
    key: str | None,
    headers: list[tuple[str, str | bytes | None]],
    on_delivery: Any,
    **extra: Any,
) -> None:
    """Produce one message, serving delivery reports while the local queue is full. Raises
    :class:`KafkaException` if librdkafka refuses it at once (e.g. too large)."""
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=on_delivery, **extra)
            return
        except BufferError:
            producer.poll(0.05)


class KafkaSink:
    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._prefix = settings.kafka_topic_prefix
        self._fatal: KafkaError | None = None
        config = producer_config(settings)
        # reports of refused messages only: a delivered one costs a callback into Python and a
        # Message object per message (~1 µs, ~5% of the relay's CPU); the batch is complete
        # when the producer's queue is empty (see _wait)
        config.setdefault("delivery.report.only.error", True)
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
        return self.send(rows, timeout)()

    def send(self, rows: Sequence[OutboxRow], timeout: float) -> Callable[[], list[Outcome]]:
        """Hand ``rows`` to the producer and return; the result waits for their delivery (at
        most ``timeout`` seconds from now) and returns their outcomes (see :class:`Pipelined`)."""
        deadline = time.monotonic() + timeout
        outcomes: list[Outcome | None] = [None] * len(rows)
        failed_keys: set[str] = set()
        reports = DeliveryReports()
        on_delivery = reports.on_delivery
        produce = self._producer.produce
        prefix = self._prefix
        queued: list[int] = []
        for i, row in enumerate(rows):
            if failed_keys and row.key is not None and row.key in failed_keys:
                outcomes[i] = Outcome.skip()
                continue
            topic, headers = prefix + row.topic, message_headers(row)
            try:
                try:
                    produce(topic, row.payload, row.key, headers=headers, on_delivery=on_delivery)
                except BufferError:
                    produce_when_room(
                        self._producer, topic, row.payload, row.key, headers, on_delivery
                    )
                queued.append(i)
            except KafkaException as exc:  # refused before it was sent (e.g. too large)
                outcomes[i] = Outcome.fail(f"kafka: {describe(exc)}")
                if row.key is not None:
                    failed_keys.add(row.key)

        def finish() -> list[Outcome]:
            complete = self._wait(max(0.0, deadline - time.monotonic()))
            if reports.fatal is not None:
                self._fatal = reports.fatal
            if self._fatal is not None:
                raise FatalSinkError(f"kafka producer fatal error: {self._fatal.str()}")
            for i, outcome in reports.outcomes(rows, queued, prefix, complete).items():
                outcomes[i] = outcome
            return [o if o is not None else Outcome.skip() for o in outcomes]

        return finish

    def _wait(self, timeout: float) -> bool:
        """Until every message produced has been delivered or refused (the producer's queue is
        empty; only this sink's one publishing thread produces on it): True, or False at the
        timeout or on a fatal error."""
        deadline = time.monotonic() + timeout
        while True:
            # flush sends at once (no linger) and serves delivery callbacks
            left = self._producer.flush(min(0.05, max(0.0, deadline - time.monotonic())))
            if left == 0:
                return True
            if time.monotonic() >= deadline or self._fatal is not None:
                return False

    def close(self, timeout: float) -> None:
        self._producer.flush(timeout)


def check_reachable(client: Any, servers: str | None, timeout: float) -> None:
    """Raise :class:`SinkUnavailable` unless ``client`` (a producer or an admin client) gets
    the cluster's metadata within ``timeout`` seconds."""
    try:
        client.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise SinkUnavailable(f"cannot reach Kafka at {servers}: {describe(exc)}") from None


def describe(exc: BaseException | KafkaError) -> str:
    """One line for a Kafka error or exception: librdkafka's text and the error's name."""
    err = exc
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        err = exc.args[0]
    if isinstance(err, KafkaError):
        return f"{err.str()} ({err.name()})"
    return str(exc)
