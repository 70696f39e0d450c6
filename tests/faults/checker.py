"""The queue checker: what was committed vs what the consumer saw.

Ground truth for "committed" is the database at the end of a run (a producer whose COMMIT raised
during a Postgres restart does not know whether it committed; the database does): the
``committed_log`` a row trigger fills in each producer's transaction (see conftest.py), since the
relay deletes delivered rows from the outbox.
Messages rolled back on purpose are recorded by the workload and must never be delivered.

Order is judged per key on the *first* copy of each message: duplicates repeat earlier messages
(at-least-once), but a message must not first appear before an earlier one of its key.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from outbox_relay import Message, enqueue_many

from ..conftest import Outbox, Received


@dataclass
class Report:
    scenario: str
    committed: int
    delivered_unique: int
    lost: int
    unexpected: int
    duplicates: int
    order_violations: int
    duplicate_keys: list[str]
    duplicate_key_mismatches: int
    rolled_back: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["duplicate_keys"] = self.duplicate_keys[:50]
        return d


def check(
    scenario: str,
    outbox: Outbox,
    received: Iterable[Received],
    rolled_back: set[str],
    seconds: float,
    commit_order: dict[str, int] | None = None,
) -> Report:
    """Compare what committed with what was consumed.

    ``commit_order`` maps a message id to its position in its key's commit order; without it the
    order is the outbox id order (``outbox-id`` header), which is what the relay promises.
    """
    rows = outbox.sql(f'SELECT idempotency_key, id, key FROM "{outbox.schema}".committed_log')
    committed = {r[0]: (int(r[1]), r[2]) for r in rows}
    copies: dict[str, int] = defaultdict(int)
    header_keys: dict[str, set[str]] = defaultdict(set)
    firsts: list[tuple[str, str | None]] = []
    for m in received:
        mid = json.loads(m.value)["mid"]
        header_keys[mid].add(m.headers.get("idempotency-key", ""))
        if copies[mid] == 0:
            firsts.append((mid, m.key))
        copies[mid] += 1
    delivered = set(copies)
    lost = set(committed) - delivered
    unexpected = (delivered - set(committed)) | (delivered & rolled_back)
    dup_keys = sorted(k for k, n in copies.items() if n > 1)
    mismatches = sum(1 for k, keys in header_keys.items() if keys != {k})
    violations = 0
    examples: list[str] = []
    last: dict[str | None, int] = {}
    for mid, key in firsts:
        if mid not in committed or key is None:
            continue
        rank = commit_order[mid] if commit_order is not None else committed[mid][0]
        if key in last and rank < last[key]:
            violations += 1
            if len(examples) < 5:
                examples.append(f"key {key}: {rank} first arrived after {last[key]}")
        last[key] = max(rank, last.get(key, rank))
    return Report(
        scenario=scenario,
        committed=len(committed),
        delivered_unique=len(delivered & set(committed)),
        lost=len(lost),
        unexpected=len(unexpected),
        duplicates=sum(copies.values()) - len(copies),
        order_violations=violations,
        duplicate_keys=dup_keys,
        duplicate_key_mismatches=mismatches,
        rolled_back=len(rolled_back),
        seconds=round(seconds, 1),
        extra={"order_violation_examples": examples} if examples else {},
    )


class Workload:
    """Producers enqueueing numbered messages over many keys from concurrent transactions.

    Each key belongs to one producer thread, so a key's id order is its commit order. About
    ``rollback_ratio`` of the transactions roll back on purpose. Transactions that fail (a
    restarted database) are retried later with new messages; the table decides what committed.
    """

    def __init__(
        self,
        engine: Engine,
        topic: str,
        *,
        producers: int = 4,
        keys_per_producer: int = 25,
        rollback_ratio: float = 0.1,
        pause: float = 0.004,
        max_messages: int = 200_000,
    ) -> None:
        self.engine = engine
        self.topic = topic
        self.producers = producers
        self.keys_per_producer = keys_per_producer
        self.rollback_ratio = rollback_ratio
        self.pause = pause
        self.max_messages = max_messages
        self.rolled_back: set[str] = set()
        self.errors = 0
        self.attempted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _run(self, w: int) -> None:
        rnd = random.Random(w * 7919 + int(time.time()))
        while not self._stop.is_set() and self.attempted < self.max_messages:
            msgs = []
            for _ in range(rnd.randint(1, 5)):
                mid = uuid.uuid4().hex
                key = f"p{w}-k{rnd.randrange(self.keys_per_producer)}"
                msgs.append(Message(self.topic, {"mid": mid, "p": w}, key=key, idempotency_key=mid))
            rollback = rnd.random() < self.rollback_ratio
            try:
                with Session(self.engine) as s:
                    s.begin()
                    enqueue_many(s, msgs)
                    if rollback:
                        s.rollback()
                        with self._lock:
                            self.rolled_back.update(m.idempotency_key or "" for m in msgs)
                    else:
                        s.commit()
            except DBAPIError:
                with self._lock:
                    self.errors += 1
                time.sleep(0.2)
            with self._lock:
                self.attempted += len(msgs)
            time.sleep(self.pause)

    def start(self) -> Workload:
        for w in range(self.producers):
            t = threading.Thread(target=self._run, args=(w,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def run_for(self, seconds: float, during: Callable[[], None] | None = None) -> None:
        """Produce for ``seconds``; ``during`` runs in the foreground meanwhile (the fault)."""
        self.start()
        end = time.monotonic() + seconds
        try:
            if during is not None:
                during()
            while time.monotonic() < end:
                time.sleep(0.1)
        finally:
            self.stop()
