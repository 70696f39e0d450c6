"""Retention: delete sent rows older than ``OUTBOX_RETENTION`` in small batches.

Each statement deletes among the next ``OUTBOX_RETENTION_BATCH`` rows by id (a window walked along
the primary key), in its own short autocommit transaction, so no statement holds more than one
batch of row locks and nothing keeps a snapshot open (which would hold back vacuum). Pending rows
and dead letters (also discarded ones) are never deleted. One run at a time per outbox: the run
holds a session advisory lock, whether the relay runs it or ``outbox-relay retention run`` does.

The relay runs retention in slices from its maintenance tick (at most one slice of about
:data:`SLICE_SECONDS` per rebalance interval), so deleting never stalls draining for long;
the command line runs it to the end. docs/operations.md has the measurements behind the design.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from . import metrics
from .store import Store

log = logging.getLogger(__name__)

#: Seconds of deleting per slice in the relay (at least one batch).
SLICE_SECONDS = 0.25


@dataclass
class RetentionRun:
    """Progress and result of one run (one cutoff, a walk over the table's ids)."""

    cutoff: dt.datetime
    started: float = field(default_factory=time.monotonic)
    after: int = 0
    deleted: int = 0
    scanned: int = 0
    batches: int = 0
    first_id: int | None = None
    last_id: int | None = None
    max_batch_seconds: float = 0.0
    done: bool = False

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["cutoff"] = self.cutoff.isoformat()
        out["seconds"] = round(time.monotonic() - self.started, 3)
        out["max_batch_seconds"] = round(self.max_batch_seconds, 4)
        del out["started"], out["after"]
        return out


class Retention:
    """Runs retention for one outbox on a caller-supplied autocommit connection."""

    def __init__(self, store: Store, retention: float, batch: int) -> None:
        self.store = store
        self.retention = retention
        self.batch = batch

    @property
    def enabled(self) -> bool:
        return self.retention > 0

    def begin(self, conn: psycopg.Connection[Any]) -> RetentionRun:
        return RetentionRun(self.store.retention_cutoff(conn, self.retention))

    def count(self, conn: psycopg.Connection[Any]) -> tuple[dt.datetime, dict[str, Any]]:
        """Dry run: the cutoff and how many rows a run would delete now (one full scan)."""
        cutoff = self.store.retention_cutoff(conn, self.retention)
        return cutoff, self.store.retention_count(conn, cutoff)

    def step(self, conn: psycopg.Connection[Any], run: RetentionRun) -> None:
        """One DELETE statement: the next window of ids. Sets ``run.done`` at the end."""
        started = time.monotonic()
        res = self.store.retention_window(conn, run.cutoff, run.after, self.batch)
        took = time.monotonic() - started
        metrics.RETENTION_BATCH_SECONDS.observe(took)
        run.batches += 1
        run.max_batch_seconds = max(run.max_batch_seconds, took)
        deleted = int(res["deleted"])
        run.deleted += deleted
        run.scanned += int(res["scanned"])
        if deleted:
            metrics.RETENTION_DELETED.inc(deleted)
            if run.first_id is None:
                run.first_id = int(res["min_deleted"])
            run.last_id = int(res["max_deleted"])
            log.debug(
                "retention batch deleted %d rows (ids %s..%s) in %.1f ms",
                deleted,
                res["min_deleted"],
                res["max_deleted"],
                took * 1000,
                extra={
                    "rows": deleted,
                    "first_id": res["min_deleted"],
                    "last_id": res["max_deleted"],
                },
            )
        first_created = res["first_created"]
        if (
            res["last_id"] is None
            or int(res["scanned"]) < self.batch
            # the whole window was created after the cutoff: so was everything after it (ids
            # grow with created_at up to a transaction's length); a later run gets the rest
            or (first_created is not None and first_created >= run.cutoff)
        ):
            run.done = True
            # the delivery counters of `status` live as long as sent rows, an hour at least
            self.store.prune_sent_stats(conn, max(self.retention, 3600.0))
        else:
            run.after = int(res["last_id"])

    def run(
        self,
        conn: psycopg.Connection[Any],
        run: RetentionRun | None = None,
        *,
        budget: float | None = None,
        progress: Callable[[RetentionRun], None] | None = None,
    ) -> RetentionRun:
        """Delete until done, or until ``budget`` seconds passed (at least one batch)."""
        run = run or self.begin(conn)
        deadline = None if budget is None else time.monotonic() + budget
        while not run.done:
            self.step(conn, run)
            if progress is not None:
                progress(run)
            if deadline is not None and time.monotonic() >= deadline:
                break
        return run


__all__ = ["SLICE_SECONDS", "Retention", "RetentionRun"]
