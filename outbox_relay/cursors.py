"""Per-shard fetch cursors that never step over a row a still-running transaction may commit.

Reading every shard from its first pending row each round is simple but slow whenever another
session holds a transaction open: Postgres can then neither prune the rows the relay already
published nor their index entries, and each fetch walks all of them again. So the relay reads
each shard from close behind the last row it published (its *cursor*).

The danger is a row whose id is below a cursor and that becomes visible only later: ids are
taken at INSERT, rows appear at COMMIT. If the relay stepped over such a row, a later row of the
same key could be published first, even for an application that writes each key from one
transaction at a time. Two rules prevent it:

* Right before each fetch the relay lists the transactions that may still commit outbox rows:
  those holding a transaction id (``pg_stat_activity.backend_xid``, prepared transactions) and
  the statements in flight that have none yet (``backend_xmin``: a statement holds a snapshot
  while it runs). An INSERT takes its outbox id before its transaction id, but within one
  statement; so a transaction that may commit an outbox row the fetch cannot see is either on
  that list or took that row's id after the list was read, however the row was written.
* A transaction first listed at fetch *n* took its ids after fetch *n-2* saw the table; it is
  remembered with the cursors of that time, and once it is off the list (ended) the next fetch
  reads each shard from no higher than those. A transaction that got its id after the list was
  read took its outbox ids after the previous fetch's snapshot, so every fetch reads from the
  cursor of the fetch *before* the last one (one batch of margin), never from the last one.
* A remembered transaction may end between the list and the fetch: its rows are then visible
  but may lie below where the fetch read. The list is read again after the fetch; if such a
  transaction is gone from it, the fetch is planned and run again before anything is published,
  and that fetch is checked the same way (another may end during it). After three fetches in
  a row, the next reads each shard from below where any remembered transaction's rows may lie,
  which no ending transaction can make stale (a busy stream of short transactions gets there
  often; reading every shard from its start instead walked all the rows deleted since the last
  vacuum, each time).

A transaction that stays open for hours (a report, an idle-in-transaction client) thus does not
hold the cursors back while it runs; when it ends, one fetch reads from where it started.
Rows made pending again by an UPDATE (replay, a re-queued dead letter) carry
``next_attempt_at``, so their shard is read from its start (see :mod:`relay`), and a full scan
every ``OUTBOX_RESCAN_INTERVAL`` is the safety net for anything else (e.g. rows written with an
explicit id below the cursors, or made pending again by a hand-written UPDATE).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence


class FetchCursors:
    """Where to start reading each shard; see the module docstring."""

    def __init__(self) -> None:
        self._cursor: dict[int, int] = {}  # after the last fetch
        self._previous: dict[int, int] = {}  # after the fetch before it
        self._floor: dict[int, int] = {}  # where ended transactions' rows may lie
        #: running transaction -> the cursors its rows lie above
        self._running: dict[int, dict[int, int]] = {}
        #: pid -> the cursors of its statement without a transaction id, at the last plan
        self._statements: dict[int, dict[int, int]] = {}

    def plan(
        self,
        running: Collection[int] | Mapping[int, int],
        shards: Sequence[int],
        from_start: Iterable[int] = (),
    ) -> list[int]:
        """The id to read each of ``shards`` from (exclusive; 0 = its first row), given the
        transactions running just before this fetch: transaction ids, and statements without
        one yet as negative numbers; as a mapping, with each one's pid."""
        for xid in [x for x in self._running if x not in running]:
            below = self._running.pop(xid)
            for shard in self._cursor:
                self._floor[shard] = min(
                    self._floor.get(shard, below.get(shard, 0)), below.get(shard, 0)
                )
        pids: Mapping[int, int] = running if isinstance(running, Mapping) else {}
        for xid in running:
            if xid in self._running:
                continue
            earlier = self._statements.get(pids.get(xid, 0)) if xid > 0 else None
            if earlier is None:
                self._running[xid] = self._previous
            else:
                # its session ran a statement without a transaction id at the last list: the
                # same transaction, which may have taken an outbox id then (an INSERT takes
                # the id first): its rows may lie as low as that statement's
                self._running[xid] = {
                    sh: min(v, earlier[sh]) for sh, v in self._previous.items() if sh in earlier
                }
        self._statements = {
            pid: self._running[x] for x, pid in pids.items() if x < 0 and pid
        }
        skip = set(from_start)
        return [
            0 if sh in skip else min(self._previous.get(sh, 0), self._floor.get(sh, 1 << 62))
            for sh in shards
        ]

    def lowest(self, shards: Sequence[int], after: Sequence[int]) -> list[int]:
        """``after``, lowered for each shard to where the rows of every transaction remembered
        as running may lie: a fetch from there cannot go :meth:`stale`, whichever of them
        ends while it runs (the last resort after several stale fetches in a row; unlike a
        read from each shard's start, it walks no further back than those transactions)."""
        return [
            min([a, *(below.get(sh, 0) for below in self._running.values())])
            for sh, a in zip(shards, after, strict=True)
        ]

    def may_go_stale(self, shards: Sequence[int], after: Sequence[int]) -> bool:
        """Is a running transaction remembered whose rows may lie below where a shard was
        read (only those can make a fetch :meth:`stale`)?"""
        start = dict(zip(shards, after, strict=True))
        return any(
            below.get(sh, 0) < start[sh]
            for below in self._running.values()
            for sh in shards
            if start[sh]
        )

    def stale(self, running: Collection[int], shards: Sequence[int], after: Sequence[int]) -> bool:
        """After a fetch planned with ``after``: has a transaction whose rows may lie below
        where a shard was read ended meanwhile (it is not in ``running``, listed after the
        fetch)? Its rows may have been visible to the fetch but not read, while a later row of
        the same key was: then fetch again (plan again first) before publishing anything."""
        start = dict(zip(shards, after, strict=True))
        for xid, below in self._running.items():
            if xid not in running and any(
                below.get(sh, 0) < start[sh] for sh in shards if start[sh]
            ):
                return True
        return False

    def advance(
        self, read: Iterable[int], last_fetched: dict[int, int], held_back: dict[int, int]
    ) -> None:
        """After a fetch that read ``read`` shards as planned: each shard's last row id, and its
        lowest row held back (not published this round although fetched), if any."""
        previous = dict(self._previous)
        for shard in read:
            self._floor.pop(shard, None)
            if shard in self._cursor:
                previous[shard] = self._cursor[shard]
            top = last_fetched.get(shard)
            if shard in held_back:
                self._cursor[shard] = held_back[shard] - 1
            elif top is not None:
                self._cursor[shard] = top
        # a new dict: the running transactions keep the one they were first seen with
        self._previous = previous

    def reset(self, shard: int) -> None:
        """Read ``shard`` from its start next time (a row of it was not delivered)."""
        self._cursor.pop(shard, None)
        self._floor.pop(shard, None)
        self._previous = {k: v for k, v in self._previous.items() if k != shard}

    def clear(self) -> None:
        """A full scan next time; forget everything (the owned shards changed)."""
        self._cursor.clear()
        self._previous = {}
        self._floor.clear()
        self._running.clear()
        self._statements = {}

    @property
    def active(self) -> bool:
        return bool(self._cursor)

    @property
    def tracked(self) -> int:
        """Transactions remembered as running."""
        return len(self._running)
