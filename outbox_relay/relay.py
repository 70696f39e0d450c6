"""The drain loop: leases, wake-ups, fetch → publish → mark, in id order per shard.

Reads like the algorithm in the design notes; every SQL statement lives in :mod:`store`, the sink
is known only through :class:`~outbox_relay.sinks.base.Sink`.

Connections (all autocommit, so no statement ever holds a transaction open):

* ``lease`` -- holds the session-level advisory locks of the owned shards plus a shared
  "present" lock every live relay holds (to size its fair share of shards);
* ``work``  -- fetches and marks rows, flips the idle flag;
* the listener's own LISTEN connection (notify mode only).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import psycopg
from tenacity import Retrying, retry_if_exception_type, stop_any, wait_random_exponential
from tenacity.stop import stop_base

from . import __version__, metrics
from .cursors import FetchCursors
from .errors import DatabaseUnavailable, FatalSinkError, OutboxError, ProxyDetected, SinkError
from .guard import Maintenance
from .health import RelayState
from .listener import Listener, Sleeper, Waiter
from .settings import Settings, redact, relay_conninfo
from .sinks.base import Outcome, Pipelined, ShardHooks, Sink
from .store import Failure, OutboxRow, Store

log = logging.getLogger(__name__)

#: Fetches run again in a row because a transaction ended during the last one; the last of
#: them reads every shard from its start (needs no list).
MAX_REFETCHES = 3

#: Short, growing polls right after going idle: they close the window in which a producer's
#: trigger saw "busy" (no NOTIFY) but its transaction committed after our last fetch.
IDLE_TAIL = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)

_CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, DatabaseUnavailable)


def backoff(attempts: int, base: float, cap: float, hint: float | None = None) -> float:
    """Seconds until the next attempt: capped exponential with full jitter, or the sink's hint."""
    if hint is not None:
        return min(cap, max(hint, 0.0)) + random.uniform(0, min(1.0, base))
    return random.uniform(0, min(cap, base * (2 ** min(attempts, 30))))


class _Ahead(NamedTuple):
    """A batch read while the one before it was being acknowledged."""

    owned: int  #: the relay's ``_owned_version`` when it was read
    rows: list[OutboxRow]
    depths: list[int]  #: the rows it asked of each shard (``Relay._depths``)


class _StopWhen(stop_base):
    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def __call__(self, retry_state: Any) -> bool:
        return self._relay.stopping


class Relay:
    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        *,
        state: RelayState | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        #: a sink with per-shard state (exactly-once Kafka) hears of every lease taken and lost
        self._hooks: ShardHooks | None = sink if isinstance(sink, ShardHooks) else None
        self.store = Store(settings.db_schema, settings.table, settings.namespace)
        self.state = state or RelayState()
        self.state.stuck_after = max(60.0, 10 * settings.poll_interval)
        self.stopping = False
        self.epochs: dict[int, int] = {}  # owned shard -> fencing epoch
        self.total_shards = 0
        self._conninfo = relay_conninfo(settings.require_database_url())
        self._work: psycopg.Connection[Any] | None = None
        self._lease: psycopg.Connection[Any] | None = None
        self._waiter: Waiter | None = None
        self._next_rebalance = 0.0
        self._idle = False
        self._cursors = FetchCursors()  # where each owned shard's next fetch starts
        self._read: list[int] = []  # the shards the last fetch read
        self._last_plan: tuple[int, list[int]] = (0, [])
        self._next_rescan = 0.0
        self._owned_version = 0
        self._ahead: _Ahead | None = None  # the next batch, read while one was acknowledged
        self._behind = True  # the last round read a full batch of some shard (or none yet)
        self._deep: set[int] = set()  # shards whose last read brought all the rows it asked
        # in a backlog a batch is marked on its own connection and thread, as soon as it is
        # acknowledged, while the next batch is read (both opened at the first backlog)
        self._marker: psycopg.Connection[Any] | None = None
        self._marker_pid = 0
        self._marking: ThreadPoolExecutor | None = None
        self.maintenance = Maintenance(settings, self.store, self.state)  # ops: guard.py

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        self.stopping = True

    def run(self, before_drain: Callable[[], None] | None = None) -> int:
        """Run until stopped. Raises :class:`OutboxError` for problems retrying cannot fix.
        ``before_drain`` runs once connected, before the first round (its error ends the run,
        and is the one reported if connecting failed too)."""
        try:
            self._start()
        except BaseException:
            if before_drain is not None:
                before_drain()
            raise
        if before_drain is not None:
            try:
                before_drain()
            except BaseException:
                self._release()
                raise
        try:
            while not self.stopping:
                try:
                    self._loop()
                except _CONNECTION_ERRORS as exc:
                    self._reconnect_after(exc, "")
        except FatalSinkError as exc:
            self.state.fatal = str(exc)
            log.error("%s; stopping with rows left pending", exc)
            self._release()
            return 3
        self._release()
        return 0

    def _start(self) -> None:
        """Connect for the first time. A database that cannot be reached at all is the
        caller's problem (one clear line, exit 2); a connection lost while the relay sets up
        (a backend terminated, a restart) is retried like any later loss."""
        try:
            self.connect()
        except DatabaseUnavailable:
            raise
        except _CONNECTION_ERRORS as exc:
            self._reconnect_after(exc, " while starting")

    def _reconnect_after(self, exc: BaseException, when: str) -> None:
        log.warning("database connection lost%s (%s); reconnecting", when, _one_line(exc))
        metrics.RECONNECTS.inc()
        if isinstance(self._waiter, Listener):
            metrics.LISTENER_RECONNECTS.inc()
        self._drop_connections()
        self._reconnect()

    def connect(self) -> None:
        """Open the connections, check the schema and the pooling mode, join the relays."""
        s = self.settings
        try:
            self._work = psycopg.connect(
                self._conninfo, autocommit=True, application_name=f"outbox-relay {s.relay_name}"
            )
            self._lease = psycopg.connect(
                self._conninfo,
                autocommit=True,
                application_name=f"outbox-relay lease {s.relay_name}",
            )
        except psycopg.OperationalError as exc:
            self._drop_connections()
            raise DatabaseUnavailable(
                f"cannot connect to {redact(s.require_database_url())}: {_one_line(exc)}"
            ) from None
        try:
            self.state.database = True
            self.store.tune_session(self._work)
            meta = self.store.check_schema(self._work)
            self.state.schema = True
            self.total_shards = int(meta["shards"])
            if s.leases:
                self._refuse_transaction_pooling(self._lease)
            self.store.harden_lease_session(self._lease)
            self.store.join_presence(self._lease)
            if s.wakeup == "notify":
                self._waiter = Listener(
                    self._conninfo,
                    s.channel,
                    f"outbox-relay listen {s.relay_name}",
                    s.heartbeat_interval,
                )
            else:
                self._waiter = Sleeper()
        except BaseException:
            self._drop_connections()  # no half-set-up session may keep a lock or a slot
            raise
        self.state.listener = self._waiter.mode
        self._next_rebalance = 0.0
        self._behind = True
        log.info(
            "outbox-relay %s connected to %s: %d shards, wake-up by %s, sink %s",
            __version__,
            redact(s.require_database_url()),
            self.total_shards,
            self._waiter.mode,
            self.sink.name,
        )

    def _reconnect(self) -> None:
        retry = Retrying(
            wait=wait_random_exponential(multiplier=0.2, max=10),
            retry=retry_if_exception_type(_CONNECTION_ERRORS),
            stop=stop_any(_StopWhen(self)),
            reraise=True,
            before_sleep=lambda rs: log.info(
                "reconnect attempt %d failed: %s",
                rs.attempt_number,
                _one_line(rs.outcome.exception()) if rs.outcome else "?",
            ),
        )
        for attempt in retry:
            with attempt:
                if self.stopping:
                    return
                self.state.tick()
                self.connect()

    def _refuse_transaction_pooling(self, conn: psycopg.Connection[Any]) -> None:
        pids = {self.store.backend_pid(conn) for _ in range(3)}
        if len(pids) > 1:
            raise ProxyDetected(
                "the database connection changes backends between transactions (a "
                "transaction-pooling proxy such as PgBouncer?): shard leases need a session. "
                "Connect the relay directly to Postgres, or set OUTBOX_LEASES=false with a single "
                "relay and OUTBOX_WAKEUP=poll"
            )

    def _drop_connections(self) -> None:
        self.state.database = False
        for conn in (self._work, self._lease, self._waiter, self._marker):
            if conn is not None:
                with contextlib.suppress(Exception):  # closing a broken connection
                    conn.close()
        self._work = self._lease = self._marker = None
        self._marker_pid = 0
        self._waiter = None
        self._ahead = None
        if self.epochs:
            log.info("dropped leases of shards %s with the connection", sorted(self.epochs))
        self._sink_release(sorted(self.epochs))
        self.epochs.clear()
        metrics.SHARDS_OWNED.set(0)
        self.state.owned = ()

    def _release(self) -> None:
        """Graceful exit: flush the sink, clear the idle flag, release the leases."""
        try:
            self.sink.close(min(5.0, self.settings.shutdown_timeout))
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("sink close failed: %s", _one_line(exc))
        if self._work is not None and self._lease is not None:
            try:
                self.store.set_idle(self._work, sorted(self.epochs), False)
                for shard in sorted(self.epochs):
                    self.store.unlock(self._lease, shard)
            except _CONNECTION_ERRORS as exc:
                log.info("leases go with the connection: %s", _one_line(exc))
        released = sorted(self.epochs)
        self.epochs.clear()
        self._drop_connections()
        log.info("relay stopped; released shards %s", released)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self.stopping:
            self.state.tick()
            self._maintain_leases()
            self._maintenance_tick()
            if not self.epochs:
                self._wait(self._until_rebalance())
                continue
            if self.drain_round() == 0:
                self._idle_wait()

    def _wait(self, timeout: float) -> bool:
        assert self._waiter is not None
        return self._waiter.wait(max(0.0, timeout), lambda: self.stopping)

    def _until_rebalance(self) -> float:
        return max(0.0, self._next_rebalance - time.monotonic())

    def _idle_wait(self) -> None:
        """Nothing pending: flag idle (so producers NOTIFY), close the race, then sleep."""
        assert self._work is not None
        notify = self.settings.wakeup == "notify"
        if notify:
            self.store.set_idle(self._work, sorted(self.epochs), True)
        try:
            for delay in IDLE_TAIL:
                woke = self._wait(delay)
                if self.stopping or self.drain_round() > 0:
                    if woke:
                        metrics.NOTIFICATIONS.inc()
                    return
            poll = self.settings.poll_interval * random.uniform(0.8, 1.2)
            woke = self._wait(min(poll, self._until_rebalance() + 0.01))
            if woke:
                metrics.NOTIFICATIONS.inc()
            elif not self.stopping and self.drain_round() > 0:
                metrics.POLLS_WITH_WORK.inc()
        finally:
            if notify and self._work is not None and not self._work.closed:
                # a broken connection is handled by the caller; the flag then stays set until
                # the next owner clears it, which only costs producers a NOTIFY meanwhile
                with contextlib.suppress(*_CONNECTION_ERRORS):
                    self.store.set_idle(self._work, sorted(self.epochs), False)

    # ------------------------------------------------------------------ leases
    def _maintain_leases(self) -> None:
        now = time.monotonic()
        if now < self._next_rebalance:
            return
        self._next_rebalance = now + self.settings.rebalance_interval * random.uniform(0.8, 1.2)
        assert self._lease is not None and self._work is not None
        if not self.settings.leases:
            if len(self.epochs) < self.total_shards:
                missing = [s for s in range(self.total_shards) if s not in self.epochs]
                for shard in missing:
                    self.epochs[shard] = self.store.take_epoch(
                        self._lease, shard, self.settings.relay_name
                    )
                self._sink_recover(missing)
                self._owned_changed()
            return
        self._verify_leases()
        live = self.store.live_relays(self._lease)
        target = math.ceil(self.total_shards / live)
        owned = set(self.epochs)
        if len(owned) > target:
            extra = sorted(owned)[target:]
            self.store.set_idle(self._work, extra, False)
            for shard in extra:
                self.store.unlock(self._lease, shard)
                del self.epochs[shard]
            self._sink_release(extra)
            log.info("released shards %s to %d other relay(s)", extra, live - 1)
            self._owned_changed()
        elif len(owned) < target:
            candidates = [s for s in range(self.total_shards) if s not in owned]
            random.shuffle(candidates)
            taken = []
            for shard in candidates:
                if len(self.epochs) >= target:
                    break
                if self.store.try_lock(self._lease, shard):
                    self.epochs[shard] = self.store.take_epoch(
                        self._lease, shard, self.settings.relay_name
                    )
                    taken.append(shard)
            taken = self._sink_recover(taken)
            if taken:
                log.info(
                    "took shards %s (now %d of %d)",
                    sorted(taken),
                    len(self.epochs),
                    self.total_shards,
                )
                self._owned_changed()

    def _verify_leases(self) -> set[int]:
        """Drop shards whose advisory lock this relay no longer holds; return those still held."""
        assert self._lease is not None
        if not self.settings.leases:
            return set(self.epochs)
        held = self.store.held_shards(self._lease)
        lost = set(self.epochs) - held
        if lost:
            log.warning("lost the leases of shards %s", sorted(lost))
            for shard in lost:
                del self.epochs[shard]
            self._sink_release(sorted(lost))
            self._owned_changed()
        return held

    # ------------------------------------------------------------------ sink shard hooks
    def _sink_recover(self, shards: list[int]) -> list[int]:
        """The leases of ``shards`` were just taken (their epochs bumped): before anything of
        them is published, let a sink with per-shard state recover them, and mark sent the ids
        it had already delivered. Returns the shards kept; the leases of those the sink could
        not recover now are given back (taken again at a later rebalance)."""
        if self._hooks is None or not shards:
            return shards
        assert self._work is not None
        try:
            recovered = self._hooks.recover(shards)
        except FatalSinkError:
            raise
        except SinkError as exc:
            log.warning("shards %s: %s", shards, exc)
            recovered = {}
        failed = [s for s in shards if s not in recovered]
        if failed:
            log.warning(
                "shards %s: the sink cannot take them now; leases given back, retried "
                "at a later rebalance",
                failed,
            )
            self._give_back(failed)
        for shard, (ids, created_max) in sorted(recovered.items()):
            if ids and shard in self.epochs:
                marked = self.store.mark_sent(
                    self._work,
                    ids,
                    {shard: self.epochs[shard]},
                    keep=self.settings.keep_sent,
                    created_max=created_max,
                )
                log.log(
                    logging.INFO if marked else logging.DEBUG,
                    "shard %d: %d of the %d ids the sink had already delivered were not marked "
                    "sent; marked now",
                    shard,
                    marked,
                    len(ids),
                )
        return [s for s in shards if s in recovered]

    def _sink_release(self, shards: Sequence[int]) -> None:
        if self._hooks is not None:
            for shard in shards:
                self._hooks.release(shard)

    def _give_back(self, shards: Sequence[int]) -> None:
        """Drop the leases of ``shards`` (still held) and tell the sink."""
        assert self._lease is not None and self._work is not None
        held = [s for s in shards if s in self.epochs]
        if self.settings.wakeup == "notify":
            self.store.set_idle(self._work, held, False)
        for shard in held:
            if self.settings.leases:
                self.store.unlock(self._lease, shard)
            del self.epochs[shard]
        self._sink_release(held)

    def _drop_lost_shards(self) -> None:
        """Give back the shards the sink may no longer publish for (fenced by a new owner, or a
        commit whose outcome it could not learn); taking one again recovers it."""
        if self._hooks is None:
            return
        lost = sorted(self._hooks.lost_shards() & set(self.epochs))
        if lost:
            log.warning(
                "shards %s: the sink can no longer publish for them; leases given back", lost
            )
            self._give_back(lost)
            self._owned_changed()
            self._next_rebalance = 0.0  # take them again (and so recover them) soon

    def _owned_changed(self) -> None:
        self._cursors.clear()
        self._owned_version += 1  # a batch read ahead is of the shards owned before
        metrics.SHARDS_OWNED.set(len(self.epochs))
        self.state.owned = tuple(sorted(self.epochs))

    # ------------------------------------------------------------------ drain
    def drain_round(self) -> int:
        """One fetch → publish → mark over the owned shards; returns rows handled."""
        assert self._work is not None
        s = self.settings
        started = time.monotonic()
        shards = sorted(self.epochs)
        if not shards:
            return 0
        batch = s.round_rows
        ahead, self._ahead = self._ahead, None
        read_ahead = ahead is not None and ahead.owned == self._owned_version
        if read_ahead:
            assert ahead is not None
            rows, depths = ahead.rows, ahead.depths
            metrics.READ_AHEAD.labels("used").inc()
        else:
            depths = self._depths(shards, batch)
            rows = self._fetch(shards, depths)
        fetched_at = time.monotonic()
        if not rows:
            self._cursors.advance(shards, {}, {})  # nothing pending from where it read
            self._behind = False
            self._deep = set()
            return 0
        self._deep = _filled(rows, shards, depths)
        # Each shard is read at least 64 rows deep, which with many shards and a small batch
        # size reads more than a round may hold: keep the first `batch` in id order (each
        # shard's rows kept are a prefix of what it read; its cursor stops at the last kept).
        full = len(rows) > batch
        if full:
            rows = rows[:batch]
        fetched = rows
        rows = self._in_sequence(rows)
        held = self._verify_leases()  # confirm the lease right before publishing
        epochs = {sh: e for sh, e in self.epochs.items() if sh in held}
        rows = [r for r in rows if r.shard in epochs]
        self._advance(fetched, rows)
        backlog = self._behind = bool(self._deep) or full
        if not rows:
            return 0
        timeout = s.kafka_delivery_timeout + 5.0
        try:
            if backlog and isinstance(self.sink, Pipelined):
                outcomes, marked = self._publish_reading_ahead(
                    self.sink, rows, epochs, shards, self._depths(shards, batch), timeout
                )
            else:
                outcomes, marked = self.sink.publish(rows, timeout), None
        except FatalSinkError:
            self._ahead = None
            self.state.sink = False
            raise
        published_at = time.monotonic()
        self._record(rows, outcomes, epochs, marked)
        self._drop_lost_shards()
        if log.isEnabledFor(logging.DEBUG):
            self._log_batch(rows, outcomes, read_ahead, (started, fetched_at, published_at))
        metrics.BATCH_SIZE.observe(len(rows))
        metrics.BATCH_SECONDS.observe(time.monotonic() - started)
        return len(rows)

    def _publish_reading_ahead(
        self,
        sink: Pipelined,
        rows: list[OutboxRow],
        epochs: dict[int, int],
        shards: list[int],
        depths: list[int],
        timeout: float,
    ) -> tuple[list[Outcome], int | None]:
        """A backlog: publish ``rows`` and, while they are acknowledged, read the next batch
        (``depths`` rows of each of ``shards``; this batch's rows are not marked yet, so they
        are left out by id; the batch read is used only if every row is delivered). Once all
        are acknowledged they are marked at once,
        on a connection and thread of their own, still before anything more is published.
        Returns the outcomes and the rows marked, or None if not marked here (see
        :meth:`_record`)."""
        if self._marker is None:
            self._marker = psycopg.connect(
                self._conninfo,
                autocommit=True,
                application_name=f"outbox-relay mark {self.settings.relay_name}",
            )
            self.store.tune_session(self._marker)
            self._marker_pid = self.store.backend_pid(self._marker)
        if self._marking is None:
            self._marking = ThreadPoolExecutor(1, thread_name_prefix="outbox-mark")
        ids = [r.id for r in rows]
        finish = sink.send(rows, timeout)
        marking = self._marking.submit(self._finish_and_mark, finish, ids, epochs, self._marker)
        try:
            ahead = self._fetch(shards, depths, skip=ids)
        except BaseException:
            with contextlib.suppress(Exception):
                marking.result()  # never leave the marker busy behind a reconnect
            raise
        result = marking.result()
        self._ahead = _Ahead(self._owned_version, ahead, depths)
        return result

    def _finish_and_mark(
        self,
        finish: Callable[[], list[Outcome]],
        ids: list[int],
        epochs: dict[int, int],
        conn: psycopg.Connection[Any],
    ) -> tuple[list[Outcome], int | None]:
        outcomes = finish()
        if not all(o.delivered for o in outcomes):
            return outcomes, None  # the failures are recorded with the rest, by _record
        return outcomes, self.store.mark_sent(conn, ids, epochs, keep=self.settings.keep_sent)

    def _depths(self, shards: list[int], batch: int) -> list[int]:
        """How many rows to ask of each shard: an equal share of the batch (at least 64).
        When some shards brought all they were asked last time and others did not, the
        others are asked for 64 and the busy ones share the rest: a hot key's shard is read
        as deep as the batch allows instead of a sixteenth of it (rows of one key all live
        in one shard)."""
        low = min(64, batch)
        even = max(batch // len(shards), low)
        busy = sum(1 for sh in shards if sh in self._deep)
        if busy in (0, len(shards)):
            return [even] * len(shards)
        share = max(even, (batch - low * (len(shards) - busy)) // busy)
        return [share if sh in self._deep else low for sh in shards]

    def _fetch(
        self, shards: list[int], depths: list[int], skip: Sequence[int] = ()
    ) -> list[OutboxRow]:
        """Pending rows of the owned shards, up to ``depths`` of each (same order), each
        shard read from its cursor (see :mod:`~outbox_relay.cursors`), none of the ids in
        ``skip``.

        A shard with rows in retry state is read from its start: once a retrying key's backoff
        ends, its earlier rows must go out before the later ones past the cursor. Every
        ``OUTBOX_RESCAN_INTERVAL`` every shard is read from its start (the safety net).
        """
        assert self._work is not None
        s = self.settings
        cursors = s.rescan_interval > 0
        retrying, blocked, running = self.store.held(
            self._work, shards, s.strict_order, list_running=cursors
        )
        running = self._others(running)
        if not cursors:  # the default: every shard from its first pending row, no bookkeeping
            self._read = shards
            return self.store.fetch(self._work, shards, blocked, depths, skip=skip)
        now = time.monotonic()
        full = now >= self._next_rescan
        if full:
            self._next_rescan = now + s.rescan_interval
        for shard in retrying:
            # its blocked keys' rows are left out of this read: no cursor may pass them, so the
            # first read after the shard's retries are through starts at its first row again
            self._cursors.reset(shard)
        from_start = shards if full else retrying
        after = self._cursors.plan(running, shards, from_start)
        rows = self.store.fetch(self._work, shards, blocked, depths, after, skip)
        # A remembered transaction that ended while a fetch ran may have left rows below where
        # it read: fetch again, and check that fetch the same way (a transaction can end
        # during any of them). After MAX_REFETCHES, each shard is read from below every
        # remembered transaction's rows (FetchCursors.lowest), which cannot go stale.
        for attempt in range(1, MAX_REFETCHES + 1):
            if not self._cursors.may_go_stale(shards, after):
                break
            running = self._others(self.store.running_xids(self._work))
            if not self._cursors.stale(running, shards, after):
                break
            after = self._cursors.plan(running, shards, from_start)
            if attempt == MAX_REFETCHES:
                after = self._cursors.lowest(shards, after)
            rows = self.store.fetch(self._work, shards, blocked, depths, after, skip)
            metrics.REFETCHES.inc()
        self._read = shards
        self._last_plan = (len(running), after)
        return rows

    def _others(self, running: dict[int, int]) -> dict[int, int]:
        """``running`` without this relay's marking session: it only deletes (or updates)
        rows, it never writes one, so it cannot hold a row below a cursor."""
        if not self._marker_pid:
            return running
        return {x: pid for x, pid in running.items() if pid != self._marker_pid}

    def _advance(self, fetched: Sequence[OutboxRow], kept: Sequence[OutboxRow]) -> None:
        """Move each shard's cursor to its last fetched row, but never past a row that was
        fetched and held back (not contiguous in its key's sequence, or a lease just lost)."""
        last: dict[int, int] = {}
        held_back: dict[int, int] = {}
        for r in fetched:
            last[r.shard] = r.id  # rows come in id order
        if len(kept) < len(fetched):
            kept_ids = {r.id for r in kept}
            for r in fetched:
                if r.id not in kept_ids:
                    held_back[r.shard] = min(held_back.get(r.shard, r.id), r.id)
        self._cursors.advance(self._read, last, held_back)

    def _in_sequence(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """Keep each sequenced key's rows only in a contiguous run from its lowest pending
        sequence number, in sequence order; the rest wait for a later round. (Rows arrive in
        id order, which can differ from the commit order the sequence follows.)"""
        sequenced: dict[tuple[str, str], list[OutboxRow]] = {}
        plain = []
        for r in rows:
            if r.seq is None or r.key is None:
                plain.append(r)
            else:
                sequenced.setdefault((r.topic, r.key), []).append(r)
        if not sequenced:
            return rows
        assert self._work is not None
        lowest = self.store.lowest_pending_seq(self._work, sorted(sequenced))
        for k, group in sequenced.items():
            group.sort(key=lambda r: r.seq or 0)
            expect = lowest.get(k)
            for r in group:
                if r.seq != expect or expect is None:
                    break
                plain.append(r)
                expect += 1
        return plain

    def _record(
        self,
        rows: Sequence[OutboxRow],
        outcomes: Sequence[Outcome],
        epochs: dict[int, int],
        marked: int | None = None,
    ) -> None:
        """Mark the delivered rows sent (unless ``marked`` says how many already were), record
        the failures, count."""
        assert self._work is not None
        s = self.settings
        sink = self.sink.name
        delivered: list[OutboxRow] = []
        failures: list[tuple[OutboxRow, Failure]] = []
        deferred: list[Failure] = []
        for r, o in zip(rows, outcomes, strict=True):  # one pass: this runs for every row
            if o.delivered:
                delivered.append(r)
                continue
            self._cursors.reset(r.shard)  # read its shard from the start again (see _fetch)
            if self._ahead is not None:  # read past this row: its key's later rows must wait
                self._ahead = None
                metrics.READ_AHEAD.labels("voided").inc()
            if not o.failed:
                continue
            if o.counts_attempt:
                wait = backoff(r.attempts, s.retry_backoff_base, s.retry_backoff_max, o.retry_after)
                failures.append((r, Failure(r.id, o.error or "failed", wait)))
            else:
                later = o.retry_after or s.poll_interval
                deferred.append(Failure(r.id, o.error or "deferred", later))
        if deferred:
            self.store.mark_deferred(self._work, deferred, epochs)
        self.state.sink = bool(delivered) or not (failures or deferred)
        if delivered:
            if marked is None:
                marked = self.store.mark_sent(
                    self._work, [r.id for r in delivered], epochs, keep=s.keep_sent
                )
            if marked < len(delivered):
                # Another relay took a shard over between publish and mark: its epoch fenced us
                # out; it will publish those rows again (same idempotency keys).
                metrics.FENCED.inc(len(delivered) - marked)
                log.warning("%d delivered rows not marked: lease moved on", len(delivered) - marked)
            now = time.time()
            per_topic: dict[str, int] = {}
            for r in delivered:
                per_topic[r.topic] = per_topic.get(r.topic, 0) + 1
            for topic, n in per_topic.items():
                metrics.PUBLISHED.labels(topic, sink).inc(n)
            # lag of at most ~100 evenly spaced rows per round: the histogram keeps its shape
            # without a per-message cost on the hot path
            for r in delivered[:: max(1, len(delivered) // 100)]:
                metrics.LAG.observe(max(0.0, now - r.created_at))
        if failures:
            dead = set(
                self.store.mark_failed(self._work, [f for _, f in failures], epochs, s.max_attempts)
            )
            for r, f in failures:
                metrics.FAILED.labels(r.topic, sink).inc()
                if r.id in dead:
                    metrics.DEAD_LETTERED.labels(r.topic, sink).inc()
                    log.error(
                        "outbox id %d (topic %s, key %s) dead-lettered after %d attempts: %s",
                        r.id,
                        r.topic,
                        r.key,
                        r.attempts + 1,
                        f.error,
                    )
                else:
                    log.warning(
                        "outbox id %d (topic %s) attempt %d failed, retry in %.1fs: %s",
                        r.id,
                        r.topic,
                        r.attempts + 1,
                        f.delay,
                        f.error,
                    )

    # ------------------------------------------------------------------ operations (guard.py)
    def _maintenance_tick(self) -> None:
        """Gauges, schema drift and Postgres-health checks, a retention slice; each rate-limited
        inside :class:`~outbox_relay.guard.Maintenance`, so this is cheap to call every round."""
        assert self._work is not None
        self.maintenance.tick(self._work, sorted(self.epochs), caught_up=not self._behind)

    def _log_batch(
        self,
        rows: Sequence[OutboxRow],
        outcomes: Sequence[Outcome],
        read_ahead: bool,
        times: tuple[float, float, float],
    ) -> None:
        """One debug line per batch: shards, id range, counts (never payloads), and where its
        time went: ``times`` = when the round started, its rows were read, the sink was done (on a
        backlog the sink's part includes the mark and the next read, which run beside it)."""
        delivered = sum(1 for o in outcomes if o.delivered)
        failed = sum(1 for o in outcomes if o.failed)
        first, last = min(r.id for r in rows), max(r.id for r in rows)
        started, fetched, published = times
        now = time.monotonic()
        log.debug(
            "batch of %d rows (ids %d..%d%s): %d delivered, %d failed, %d not attempted",
            len(rows),
            first,
            last,
            ", read ahead" if read_ahead else "",
            delivered,
            failed,
            len(rows) - delivered - failed,
            extra={
                "read_ahead": read_ahead,
                "shards": sorted({r.shard for r in rows}),
                "first_id": first,
                "last_id": last,
                "rows": len(rows),
                "delivered": delivered,
                "failed": failed,
                "ms": round((now - started) * 1000, 1),
                "fetch_ms": round((fetched - started) * 1000, 1),
                "publish_ms": round((published - fetched) * 1000, 1),
                "mark_ms": round((now - published) * 1000, 1),
                "running_xids": self._last_plan[0],
                "read_after": self._last_plan[1],
            },
        )


def _filled(rows: Sequence[OutboxRow], shards: list[int], depths: list[int]) -> set[int]:
    """The shards of which ``rows`` (one read, before any cap) hold all that was asked: more
    of them may be pending."""
    count: dict[int, int] = {}
    for r in rows:
        count[r.shard] = count.get(r.shard, 0) + 1
    return {sh for sh, depth in zip(shards, depths, strict=True) if count.get(sh, 0) >= depth}


def _one_line(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["OutboxError", "Relay", "backoff"]
