"""Per-shard fetch cursors that never step over a row a still-running transaction may commit.

Reading every shard from its first pending row each round is simple but slow whenever another
session holds a transaction open: Postgres can then neither prune the rows the relay already
published nor their index entries, and each fetch walks all of them again. So the relay reads
each shard from just past the last row it published (its *cursor*).

The danger is a row whose id is below a cursor and that becomes visible only later: ids are
taken at INSERT, rows appear at COMMIT. If the relay stepped over such a row, a later row of the
same key could be published first, even for an application that writes each key from one
transaction at a time. The cursors avoid that with the transaction snapshot the fetch itself
runs under (``pg_current_snapshot()``, in the same REPEATABLE READ transaction):

* every transaction in progress at a fetch is remembered with the cursors as they were *before
  the previous fetch*: the rows it may commit have ids above those (they were taken after
  that earlier fetch saw the table), with one fetch of margin for a transaction that took its
  id just before that snapshot and its transaction id just after;
* once such a transaction has ended, the next fetch reads each shard from no higher than the
  cursors it was remembered with, so its rows come out before anything after them.

A transaction that stays open for hours (a report, an idle-in-transaction client) thus does not
hold the cursors back while it runs; when it ends, one fetch reads from where it started.
Rows made pending again by an UPDATE (replay, a re-queued dead letter) carry
``next_attempt_at``, so their shard is read from its start (see :mod:`relay`), and a full scan
every ``OUTBOX_RESCAN_INTERVAL`` is the safety net for anything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Snapshot:
    """``pg_current_snapshot()``: transactions below ``xmin`` have ended, those from ``xmax``
    on had not started, ``xip`` lists the ones in progress in between."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def ended(self, xid: int) -> bool:
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)


class FetchCursors:
    """Where to start reading each shard; see the module docstring."""

    def __init__(self) -> None:
        self._cursor: dict[int, int] = {}
        self._before_previous: dict[int, int] = {}
        #: in-progress transaction -> the cursors its rows may lie above
        self._running: dict[int, dict[int, int]] = {}

    def plan(
        self, snapshot: Snapshot, shards: Sequence[int], from_start: Iterable[int] = ()
    ) -> list[int]:
        """The id to read each of ``shards`` from (exclusive; 0 = its first row)."""
        start = dict(self._cursor)
        for xid in [x for x in self._running if snapshot.ended(x)]:
            below = self._running.pop(xid)
            for shard in list(start):
                start[shard] = min(start[shard], below.get(shard, 0))
        base = {
            sh: min(c, self._before_previous.get(sh, 0)) for sh, c in self._cursor.items()
        }
        for xid in snapshot.xip:
            self._running.setdefault(xid, base)
        self._before_previous = dict(self._cursor)
        skip = set(from_start)
        return [0 if sh in skip else start.get(sh, 0) for sh in shards]

    def advance(self, last_fetched: dict[int, int], held_back: dict[int, int]) -> None:
        """After a fetch: each shard's last row id, and its lowest row held back (not published
        this round although fetched), if any."""
        for shard, top in last_fetched.items():
            self._cursor[shard] = held_back[shard] - 1 if shard in held_back else top

    def reset(self, shard: int) -> None:
        """Read ``shard`` from its start next time (a row of it was not delivered)."""
        self._cursor.pop(shard, None)
        self._before_previous.pop(shard, None)
        for below in self._running.values():
            below.pop(shard, None)

    def clear(self) -> None:
        """A full scan next time; forget everything (the owned shards changed)."""
        self._cursor.clear()
        self._before_previous.clear()
        self._running.clear()

    @property
    def active(self) -> bool:
        return bool(self._cursor)

    @property
    def tracked(self) -> int:
        """Transactions remembered as in progress (a gauge for debugging)."""
        return len(self._running)
