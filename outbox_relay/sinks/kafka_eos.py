"""Exactly-once into Kafka (``OUTBOX_KAFKA_EXACTLY_ONCE=true``): a transactional producer per shard.

Every round, each owned shard's rows go out in **one Kafka transaction** of the shard's own
producer (``transactional.id`` = ``<prefix>-<shard>``), together with a *progress record* on a
compacted topic, keyed by the shard, that names exactly the outbox ids the transaction carried
(ids, not a high-water mark: a lower id can commit after a higher one). The relay marks those ids
sent before it publishes the shard's next batch, so the last committed progress record of a shard
is all a new owner needs:

1. ``recover(shards)`` (the relay calls it right after taking the shards' leases; shards are
   recovered side by side) creates each shard's producer and calls ``init_transactions``: that
   fences every earlier producer of the shard (a relay that lost its lease can no longer commit)
   and completes or aborts the transaction it left open;
2. then it reads the shard's last committed progress record (``read_committed``) and returns its
   ids; the relay marks them sent with its new epoch before publishing anything.

So a crash between the Kafka commit and the Postgres mark publishes nothing twice, and a consumer
with ``isolation.level=read_committed`` sees every message once. What happens when things fail:

* a message of the transaction is refused (its delivery report is an error) -> the transaction is
  aborted; the refused row fails (an attempt, backoff, later a dead letter), later rows of its key
  are skipped, the other rows are deferred (retried without counting an attempt). Nothing of an
  aborted transaction is visible to ``read_committed`` consumers;
* the producer is fenced (another relay took the shard) or hit another fatal error, or a commit's
  outcome cannot be learnt -> the shard is reported by :meth:`lost_shards`; the relay gives its
  lease back, and whoever takes it next recovers it as above with a new producer (the relay does
  not exit; only a recovery whose ``init_transactions`` fails fatally, e.g. not authorised, stops
  it);
* the progress topic is missing (deleted) -> it is created again (compacted) with a warning: the
  ids of a batch committed to Kafka but not yet marked at that moment may be published a second
  time (at-least-once, once, for that window).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

# the public names; the package's type stubs do not re-export the last two
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
)

from .. import metrics
from ..errors import ConfigError, FatalSinkError, SinkUnavailable
from ..settings import Settings
from ..store import OutboxRow
from .base import Delivered, Outcome
from .kafka import (
    DeliveryReports,
    check_reachable,
    describe,
    message_headers,
    produce_when_room,
    producer_config,
)

log = logging.getLogger(__name__)

#: errors that mean "another producer with this transactional.id took over"
_FENCED = {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
#: delivery reports of messages the producer purged when their transaction was aborted
_PURGED = {KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT}
#: properties the recovery consumer and the admin client take from OUTBOX_KAFKA_PROPERTIES
_SHARED_PREFIXES = ("security.", "sasl.", "ssl.", "client.dns", "socket.", "broker.", "enable.ssl")
#: how far back (in offsets) the first look for a shard's last progress record reaches
_SCAN_WINDOW = 64
#: seconds a recovery (producer init + progress read) may take before the lease is given back
RECOVER_TIMEOUT = 30.0


def _error(exc: KafkaException) -> KafkaError | None:
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None


def _fenced(err: KafkaError | None) -> bool:
    return err is not None and err.code() in _FENCED


@dataclass
class _Shard:
    producer: Producer
    partition: int  # of the progress topic
    unusable: bool = False  # fenced, or fatal: only a recovery (a new producer) helps


@dataclass
class _Txn:
    """One shard's transaction within a round."""

    shard: int
    state: _Shard
    token: str
    included: list[int] = field(default_factory=list)  # row indexes produced in it
    reports: DeliveryReports = field(default_factory=DeliveryReports)  # of its rows' messages
    progress: DeliveryReports = field(default_factory=DeliveryReports)  # of its progress record
    broken: str | None = None  # why it must be aborted before the commit


class KafkaExactlyOnceSink:
    """Kafka sink publishing each shard's batch in one transaction with its progress record."""

    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        for prop in ("transactional.id", "enable.idempotence"):
            if prop in settings.kafka_properties:
                raise ConfigError(
                    f"OUTBOX_KAFKA_PROPERTIES: {prop} is set by the relay in exactly-once mode "
                    "(OUTBOX_KAFKA_EXACTLY_ONCE=true); remove it"
                )
        self._settings = settings
        self._base = producer_config(settings)
        message_ms = int(self._base["message.timeout.ms"])
        # librdkafka requires message.timeout.ms <= transaction.timeout.ms
        self._base.setdefault("transaction.timeout.ms", max(60_000, message_ms + 10_000))
        if int(self._base["transaction.timeout.ms"]) < message_ms:
            raise ConfigError(
                "OUTBOX_KAFKA_PROPERTIES: transaction.timeout.ms must be at least "
                f"OUTBOX_KAFKA_DELIVERY_TIMEOUT ({message_ms} ms)"
            )
        # A producer's next transaction waits until the coordinator finished the previous one
        # (it answers CONCURRENT_TRANSACTIONS meanwhile): retrying after 10 ms instead of the
        # default 100 ms halves a round's latency (librdkafka backs off exponentially from it).
        self._base.setdefault("retry.backoff.ms", 10)
        self._topic_prefix = settings.kafka_topic_prefix
        self.progress_topic = settings.progress_topic
        self.transactional_id_prefix = settings.transactional_id_prefix
        self._client = {
            "bootstrap.servers": self._base["bootstrap.servers"],
            **{
                k: v
                for k, v in settings.kafka_properties.items()
                if k.startswith(_SHARED_PREFIXES)
            },
        }
        self._shards: dict[int, _Shard] = {}
        self._lost: set[int] = set()
        self._partitions = 0  # of the progress topic, learnt by _ensure_progress_topic
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kafka-txn")
        try:
            admin: dict[str, Any] = {
                **self._client,
                "allow.auto.create.topics": False,
                "logger": logging.getLogger("outbox_relay.librdkafka"),
            }
            self._admin = AdminClient(admin)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid Kafka configuration: {describe(exc)}") from None

    # ------------------------------------------------------------------ Sink
    def check(self, timeout: float = 10.0) -> None:
        check_reachable(self._admin, self._settings.kafka_bootstrap_servers, timeout)

    def publish(self, rows: Sequence[OutboxRow], timeout: float) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        outcomes: list[Outcome | None] = [None] * len(rows)
        by_shard: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_shard.setdefault(row.shard, []).append(i)
        txns: list[_Txn] = []
        for shard, indexes in by_shard.items():
            state = self._shards.get(shard)
            if state is None or state.unusable:
                # not recovered here (or fenced): the relay must give the lease back first
                self._lost.add(shard)
                continue
            txn = self._begin(shard, state, rows, indexes, outcomes)
            if txn is not None:
                txns.append(txn)
        # every shard's messages are on their way; settle the transactions side by side (each
        # commit is a round trip to the transaction coordinator; librdkafka waits without the GIL)
        if len(txns) == 1:
            self._settle(txns[0], rows, outcomes, deadline)
        elif txns:
            list(self._pool.map(lambda t: self._settle(t, rows, outcomes, deadline), txns))
        return [o if o is not None else Outcome.skip() for o in outcomes]

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        closing = [self._release(shard) for shard in list(self._shards)]
        for thread in closing:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ ShardHooks
    def recover(self, shards: Sequence[int]) -> dict[int, Delivered]:
        """Fence earlier producers of each shard, then return the ids its last committed
        transaction carried (the relay marks them sent before publishing the shard). Shards
        are recovered side by side; one that cannot be recovered now is left out."""
        for shard in shards:
            self.release(shard)
        if not shards:
            return {}
        deadline = time.monotonic() + RECOVER_TIMEOUT
        if self._ensure_progress_topic(deadline):
            log.warning(
                "progress topic %s did not exist (first start in exactly-once mode, or deleted) "
                "and has been created; if it was deleted, a batch committed to Kafka but not yet "
                "marked sent when its shard changed hands is published again (at-least-once for "
                "that window)",
                self.progress_topic,
            )
            created = True
        else:
            created = False

        def one(shard: int) -> Delivered | Exception:
            try:
                return self._recover(shard, created, deadline)
            except (SinkUnavailable, FatalSinkError) as exc:
                return exc

        found: dict[int, Delivered] = {}
        fatal: FatalSinkError | None = None
        for shard, result in zip(shards, self._pool.map(one, shards), strict=True):
            if isinstance(result, FatalSinkError):
                fatal = result
            elif isinstance(result, Exception):
                log.warning("shard %d: %s", shard, result)
            else:
                found[shard] = result
        if fatal is not None:
            raise fatal
        return found

    def _recover(self, shard: int, created: bool, deadline: float) -> Delivered:
        producer = self._producer(shard)
        try:
            producer.init_transactions(max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            err = _error(exc)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                producer.close()
            if err is not None and err.fatal():
                raise FatalSinkError(
                    f"shard {shard}: init_transactions for transactional.id "
                    f"{self._txn_id(shard)} failed: {describe(exc)}"
                ) from None
            raise SinkUnavailable(
                f"cannot initialise the transactional producer of shard {shard}: {describe(exc)}"
            ) from None
        partition = shard % self._partitions
        self._shards[shard] = _Shard(producer, partition)
        self._lost.discard(shard)
        if created:
            return Delivered([])
        record = self._last_progress(shard, partition, deadline)
        if record is None:
            log.info("shard %d: no progress record yet in %s", shard, self.progress_topic)
            return Delivered([])
        ids = [int(i) for i in record.get("ids", [])]
        created_max = record.get("created_max")
        log.info(
            "shard %d: last committed transaction %s carried %d ids",
            shard,
            record.get("txn"),
            len(ids),
        )
        return Delivered(ids, float(created_max) if created_max is not None else None)

    def release(self, shard: int) -> None:
        self._release(shard)

    def _release(self, shard: int) -> threading.Thread | None:
        """Forget the shard; its producer is closed on a thread of its own (returned): closing
        a producer whose abort timed out (the broker just came back) can wait for that
        transaction to end, and the relay's loop must go on (the shard's next owner's
        init_transactions fences this producer anyway)."""
        state = self._shards.pop(shard, None)
        self._lost.discard(shard)
        if state is None:
            return None
        thread = threading.Thread(
            target=_close, args=(shard, state.producer), name="outbox-eos-close", daemon=True
        )
        thread.start()
        return thread

    def lost_shards(self) -> set[int]:
        lost, self._lost = self._lost, set()
        return lost

    # ------------------------------------------------------------------ one transaction
    def _begin(
        self,
        shard: int,
        state: _Shard,
        rows: Sequence[OutboxRow],
        indexes: list[int],
        outcomes: list[Outcome | None],
    ) -> _Txn | None:
        """Begin the shard's transaction and produce its rows and its progress record."""
        txn = _Txn(shard, state, uuid.uuid4().hex)
        producer = state.producer
        try:
            producer.begin_transaction()
        except KafkaException as exc:
            self._trouble(txn, exc, "begin_transaction")
            return None
        failed_keys: set[str] = set()
        on_delivery = txn.reports.on_delivery
        for i in indexes:
            row = rows[i]
            if row.key is not None and row.key in failed_keys:
                outcomes[i] = Outcome.skip()
                continue
            error = self._produce(
                producer,
                self._topic_prefix + row.topic,
                row.payload,
                row.key,
                message_headers(row),
                on_delivery,
            )
            if error is None:
                txn.included.append(i)
            else:  # refused before anything was sent (e.g. too large): not part of the txn
                outcomes[i] = Outcome.fail(f"kafka: {error}")
                if row.key is not None:
                    failed_keys.add(row.key)
        if not txn.included:
            self._abort(txn, "no message to send")
            return None
        progress = {
            "v": 1,
            "shard": shard,
            "txn": txn.token,
            "ids": [rows[i].id for i in txn.included],
            # the rows' latest created_at: a recovery marks no row written after it (ids can
            # start again while this record lives on)
            "created_max": max(rows[i].created_at for i in txn.included),
            "relay": self._settings.relay_name,
            "at": round(time.time(), 3),
        }
        error = self._produce(
            producer,
            self.progress_topic,
            json.dumps(progress, separators=(",", ":")).encode(),
            str(shard),
            [],
            txn.progress.on_delivery,
            partition=state.partition,
        )
        if error is not None:
            txn.broken = f"progress record refused: {error}"
        return txn

    def _produce(
        self,
        producer: Producer,
        topic: str,
        value: bytes,
        key: str | None,
        headers: list[tuple[str, str | bytes | None]],
        on_delivery: Any,
        partition: int | None = None,
    ) -> str | None:
        """Produce one message (waiting while the local queue is full); the error text if it
        was refused at once."""
        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        try:
            produce_when_room(producer, topic, value, key, headers, on_delivery, **extra)
            return None
        except KafkaException as exc:
            return describe(exc)

    def _settle(
        self,
        txn: _Txn,
        rows: Sequence[OutboxRow],
        outcomes: list[Outcome | None],
        deadline: float,
    ) -> None:
        """Wait for the transaction's delivery reports, then commit it, or abort it."""
        producer = txn.state.producer

        def waiting() -> bool:
            return txn.reports.received < len(txn.included) or txn.progress.received < 1

        while waiting() and time.monotonic() < deadline:
            try:
                producer.flush(min(0.1, max(0.0, deadline - time.monotonic())))
            except KafkaException as exc:  # the producer entered a fatal state
                self._trouble(txn, exc, "flush")
                return
        if txn.state.unusable:
            self._lose(txn, "its producer was fenced by a newer one, or hit another fatal error")
            return
        refused = [err for err, _ in txn.reports.failures + txn.progress.failures]
        if txn.broken is None and waiting():
            txn.broken = "delivery not confirmed in time"
        elif txn.broken is None and refused:
            txn.broken = f"{len(refused)} message(s) refused, e.g. {describe(refused[0])}"
        if txn.broken is not None:
            if self._abort(txn, txn.broken):
                self._aborted(txn, rows, outcomes, txn.broken)
                if txn.broken.startswith("progress record") or txn.progress.failures:
                    # the progress topic is gone or changed: a recovery sets it up again
                    self._lose(txn, f"progress record not written ({txn.broken})")
            return
        while True:
            try:
                producer.commit_transaction(max(0.1, deadline - time.monotonic()))
                break
            except KafkaException as exc:
                err = _error(exc)
                if _fenced(err):
                    self._lose(txn, f"commit fenced: {describe(exc)}")
                    return
                if err is not None and err.txn_requires_abort():
                    reason = f"commit failed: {describe(exc)}"
                    if self._abort(txn, reason):
                        self._aborted(txn, rows, outcomes, reason)
                    return
                if err is not None and err.retriable() and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                # the commit may or may not have happened: only a recovery can tell
                self._lose(txn, f"commit outcome unknown: {describe(exc)}")
                return
        metrics.KAFKA_TRANSACTIONS.labels("committed").inc()
        for i in txn.included:
            outcomes[i] = Outcome.ok()

    def _abort(self, txn: _Txn, reason: str) -> bool:
        """Abort the transaction; False if that failed and the shard was given up."""
        producer = txn.state.producer
        deadline = time.monotonic() + min(30.0, self._settings.kafka_delivery_timeout)
        while True:
            try:
                producer.abort_transaction(max(0.1, deadline - time.monotonic()))
                metrics.KAFKA_TRANSACTIONS.labels("aborted").inc()
                if txn.included:
                    log.warning("shard %d: kafka transaction aborted (%s)", txn.shard, reason)
                return True
            except KafkaException as exc:
                err = _error(exc)
                if err is not None and err.retriable() and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self._lose(txn, f"abort failed: {describe(exc)}")
                return False

    def _aborted(
        self, txn: _Txn, rows: Sequence[OutboxRow], outcomes: list[Outcome | None], reason: str
    ) -> None:
        """Nothing of the transaction was delivered: the rows whose own message was refused
        fail (an attempt), later rows of their keys are skipped, the others are deferred."""
        failed_keys: set[str] = set()
        for i in txn.included:
            row = rows[i]
            err = txn.reports.error_for(row, self._topic_prefix)
            if row.key is not None and row.key in failed_keys:
                outcomes[i] = Outcome.skip()
            elif err is not None and err.code() not in _PURGED:
                outcomes[i] = Outcome.fail(
                    f"kafka: {err.str()} ({err.name()}); transaction aborted"
                )
                if row.key is not None:
                    failed_keys.add(row.key)
            else:
                outcomes[i] = Outcome.defer(f"kafka transaction aborted: {reason}", 1.0)

    def _lose(self, txn: _Txn, reason: str) -> None:
        """The shard can no longer be published here until recovered: report it to the relay.
        Its rows get no outcome (skipped): whoever recovers the shard learns what committed."""
        txn.state.unusable = True
        self._lost.add(txn.shard)
        metrics.KAFKA_TRANSACTIONS.labels("lost").inc()
        log.warning("shard %d: %s; giving the shard up", txn.shard, reason)

    def _trouble(self, txn: _Txn, exc: KafkaException, what: str) -> None:
        self._lose(txn, f"{what} failed: {describe(exc)}")

    # ------------------------------------------------------------------ producers
    def _txn_id(self, shard: int) -> str:
        return f"{self.transactional_id_prefix}-{shard}"

    def _producer(self, shard: int) -> Producer:
        config: dict[str, Any] = dict(self._base)
        config["transactional.id"] = self._txn_id(shard)
        config["client.id"] = f"{self._base['client.id']}:{shard}"
        config["error_cb"] = self._on_error(shard)
        config["logger"] = logging.getLogger("outbox_relay.librdkafka")
        try:
            return Producer(config)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid Kafka configuration: {describe(exc)}") from None

    def _on_error(self, shard: int) -> Any:
        def on_error(err: KafkaError) -> None:
            if err.fatal():  # fenced, or a state only a new producer gets out of
                state = self._shards.get(shard)
                if state is not None:
                    state.unusable = True
                log.warning("kafka producer of shard %d: fatal error: %s", shard, err.str())
            else:
                log.debug("kafka client error (shard %d): %s", shard, err.str())

        return on_error

    # ------------------------------------------------------------------ progress topic
    def _ensure_progress_topic(self, deadline: float) -> bool:
        """Learn the progress topic's partition count, creating the topic (compacted, one
        partition per shard) if it is missing; True if it had to be created."""
        topic = self.progress_topic
        created = False
        while True:
            left = max(0.1, deadline - time.monotonic())
            try:
                meta = self._admin.list_topics(topic=topic, timeout=min(10.0, left))
            except KafkaException as exc:
                raise SinkUnavailable(
                    f"cannot read the metadata of {topic}: {describe(exc)}"
                ) from None
            found = meta.topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                self._partitions = len(found.partitions)
                if not created:
                    self._check_compacted(deadline)
                return created
            if time.monotonic() >= deadline:
                raise SinkUnavailable(f"progress topic {topic} could not be created in time")
            new = NewTopic(
                topic,
                num_partitions=self._settings.shards,
                replication_factor=-1,
                config={"cleanup.policy": "compact"},
            )
            future = self._admin.create_topics([new], operation_timeout=min(10.0, left))[topic]
            try:
                future.result(timeout=min(15.0, left))
                created = True
                log.info(
                    "created progress topic %s (compacted, %d partitions)",
                    topic,
                    self._settings.shards,
                )
            except KafkaException as exc:
                err = _error(exc)
                if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    log.info("creating progress topic %s: %s; retrying", topic, describe(exc))
                    time.sleep(0.5)

    def _check_compacted(self, deadline: float) -> None:
        """Warn (once per recovery) if the progress topic is not compacted: it then grows
        without bound, and retention may delete a shard's last record (at-least-once then)."""
        resource = ConfigResource("topic", self.progress_topic)
        try:
            future = self._admin.describe_configs([resource])[resource]
            config = future.result(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
        except KafkaException as exc:
            log.info("cannot read the configuration of %s: %s", self.progress_topic, describe(exc))
            return
        entry = config.get("cleanup.policy")
        if entry is not None and "compact" not in str(entry.value):
            log.warning(
                "progress topic %s has cleanup.policy=%s, not compact: it grows without bound, "
                "and retention can delete a shard's last progress record (that shard is then "
                "at-least-once at its next takeover); set cleanup.policy=compact",
                self.progress_topic,
                entry.value,
            )

    def _consumer(self, isolation: str) -> Consumer:
        return Consumer(
            {
                **self._client,
                "group.id": f"{self.transactional_id_prefix}.recovery",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 10,  # the end of the partition is reported sooner
                "isolation.level": isolation,
                "allow.auto.create.topics": False,
                "logger": logging.getLogger("outbox_relay.librdkafka"),
            }
        )

    def _last_progress(self, shard: int, partition: int, deadline: float) -> dict[str, Any] | None:
        """The shard's last committed progress record, or None.

        Reads the partition (``read_committed``) from a little before its end up to the high
        watermark seen *after* ``init_transactions`` (nothing of this shard can be written
        after that but by us), widening the window backwards until a record of the shard turns
        up or the partition's start is reached."""
        tp = TopicPartition(self.progress_topic, partition)
        probe = self._consumer("read_uncommitted")
        try:
            while True:
                try:
                    low, high = probe.get_watermark_offsets(tp, timeout=10, cached=False)
                    break
                except KafkaException as exc:
                    err = _error(exc)  # e.g. no leader yet right after the topic was created
                    if err is None or not err.retriable() or time.monotonic() >= deadline:
                        raise SinkUnavailable(
                            f"cannot read the offsets of {self.progress_topic} [{partition}]: "
                            f"{describe(exc)}"
                        ) from None
                    time.sleep(0.1)
        finally:
            probe.close()
        if high <= low:
            return None
        window = _SCAN_WINDOW
        start = max(low, high - window)
        consumer = self._consumer("read_committed")
        try:
            while True:
                found = self._scan(consumer, tp, shard, start, high, deadline)
                if found is not None or start <= low:
                    return found
                window *= 4
                start = max(low, high - window)
        finally:
            consumer.close()

    def _scan(
        self,
        consumer: Consumer,
        tp: TopicPartition,
        shard: int,
        start: int,
        high: int,
        deadline: float,
    ) -> dict[str, Any] | None:
        key = str(shard).encode()
        consumer.assign([TopicPartition(tp.topic, tp.partition, start)])
        last: dict[str, Any] | None = None
        try:
            while True:
                if time.monotonic() >= deadline:
                    raise SinkUnavailable(
                        f"reading the progress of shard {shard} from {tp.topic} [{tp.partition}] "
                        "timed out"
                    )
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        # read_committed stops at the last stable offset: an open transaction
                        # of another shard sharing the partition ends soon, so keep reading
                        offset = msg.offset()
                        if offset is not None and offset >= high:
                            return last
                        continue
                    if error.fatal() or not error.retriable():
                        raise SinkUnavailable(
                            f"reading {tp.topic} [{tp.partition}]: {error.str()}"
                        )
                    continue
                if msg.key() == key and msg.value():
                    try:
                        last = json.loads(msg.value() or b"{}")
                    except ValueError:
                        log.warning(
                            "unreadable progress record at %s [%d] offset %s; ignored",
                            tp.topic,
                            tp.partition,
                            msg.offset(),
                        )
                offset = msg.offset()
                if offset is not None and offset + 1 >= high:
                    return last
        finally:
            consumer.unassign()


__all__ = ["RECOVER_TIMEOUT", "KafkaExactlyOnceSink"]


def _close(shard: int, producer: Producer) -> None:
    """Drop what a shard's producer still holds and close it."""
    try:
        with warnings.catch_warnings():  # "abort_transaction failed during close"
            warnings.simplefilter("ignore")
            producer.purge()
            producer.flush(0)
            producer.close()
    except (KafkaException, RuntimeError) as exc:
        log.debug("shard %d: closing its producer: %s", shard, describe(exc))
