"""Replay: publish already-sent messages again, through the running relay.

The selected sent rows are made pending again (``sent_at = NULL``, attempts reset) and get an
``outbox-replay`` header (the replay's UTC start time) merged into their headers. The relay then
publishes them like any pending row: same idempotency key, same Kafka key and partition, in id
order per shard, with fencing and retries. No copies are inserted (the idempotency key is unique,
and a copy would be a different message).

Rows are re-queued in id order, ``batch`` rows per statement (each its own short transaction),
and a NOTIFY wakes idle relays after each batch. Consequences, documented in docs/operations.md:

* replayed rows of a key are published in their original order; a relay that is also draining
  new rows of the same key may publish those in between (a replay is history, not new traffic);
* consumers that drop duplicates by idempotency key must let ``outbox-replay`` messages through
  if the point of the replay is that they process them again;
* rows already deleted by retention cannot be replayed; pending and dead rows of the selection
  are left alone (``dead-letters retry`` is for those).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from .store import Store


@dataclass(frozen=True)
class Selection:
    """Rows of ``topic``: by ``ids``, or by ``created_at`` in ``[since, until)``."""

    topic: str
    ids: Sequence[int] | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None


@dataclass
class ReplayProgress:
    total: int
    replayed: int = 0
    batches: int = 0


@dataclass(frozen=True)
class ReplayResult:
    sent: int  #: sent rows in the selection (what a replay re-queues)
    pending: int  #: selected rows still pending (left alone)
    dead: int  #: selected dead letters, discarded ones included (left alone)
    replayed: int  #: rows re-queued (0 on a dry run)
    first_id: int | None
    last_id: int | None
    marker: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def count(store: Store, conn: psycopg.Connection[Any], sel: Selection) -> ReplayResult:
    """Dry run: what a replay of ``sel`` would re-queue."""
    c = store.replay_count(conn, sel.topic, sel.ids, sel.since, sel.until)
    return ReplayResult(
        int(c["sent"]), int(c["pending"]), int(c["dead"]), 0, c["first_id"], c["last_id"], None
    )


def replay(
    store: Store,
    conn: psycopg.Connection[Any],
    sel: Selection,
    *,
    channel: str,
    batch: int = 5000,
    progress: Callable[[ReplayProgress], None] | None = None,
) -> ReplayResult:
    """Re-queue the sent rows of ``sel`` (``conn`` must be autocommit)."""
    found = count(store, conn, sel)
    if not found.sent or found.first_id is None or found.last_id is None:
        return found
    marker = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    state = ReplayProgress(found.sent)
    after = int(found.first_id) - 1
    while True:
        res = store.replay_mark(
            conn,
            sel.topic,
            sel.ids,
            sel.since,
            sel.until,
            after=after,
            last=int(found.last_id),
            limit=batch,
            marker=marker,
        )
        state.replayed += int(res["marked"])
        state.batches += 1
        if res["marked"]:
            store.notify(conn, channel, "")  # idle relays wake up; the UPDATE fires no trigger
        if progress is not None:
            progress(state)
        if int(res["selected"]) < batch or res["last_id"] is None:
            break
        after = int(res["last_id"])
    return ReplayResult(
        found.sent,
        found.pending,
        found.dead,
        state.replayed,
        found.first_id,
        found.last_id,
        marker,
    )


__all__ = ["ReplayProgress", "ReplayResult", "Selection", "count", "replay"]
