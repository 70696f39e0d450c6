"""Fetch cursors as pure logic: where each shard's next read starts, given the transactions
running before each fetch. The relay tests (`test_relay.py`) and the fault suite run the same
logic against real transactions."""

from __future__ import annotations

from outbox_relay.cursors import FetchCursors
from outbox_relay.relay import Relay
from outbox_relay.settings import load_settings
from outbox_relay.sinks.base import Outcome

SHARDS = [0, 1]


def fetch(c: FetchCursors, running: set[int], tops: dict[int, int]) -> list[int]:
    """One round: plan, then 'read' up to ``tops``; returns where it read from."""
    after = c.plan(running, SHARDS)
    c.advance(SHARDS, tops, {})
    return after


def test_reads_from_the_cursor_of_the_fetch_before_the_last() -> None:
    c = FetchCursors()
    assert fetch(c, set(), {0: 50, 1: 40}) == [0, 0]
    assert fetch(c, set(), {0: 90, 1: 60}) == [0, 0]  # one fetch of margin
    assert fetch(c, set(), {0: 120}) == [50, 40]
    assert fetch(c, set(), {}) == [90, 60]
    assert fetch(c, set(), {}) == [120, 60]


def test_a_running_transaction_pulls_the_cursor_back_when_it_ends() -> None:
    c = FetchCursors()
    fetch(c, set(), {0: 100, 1: 100})
    fetch(c, set(), {0: 200, 1: 200})
    assert fetch(c, {7}, {0: 300, 1: 300}) == [100, 100]  # 7 first listed: its rows lie > 100
    assert fetch(c, {7}, {0: 400, 1: 400}) == [200, 200]  # still running: cursors move on
    assert fetch(c, {7}, {0: 500, 1: 500}) == [300, 300]
    assert fetch(c, set(), {0: 600, 1: 600}) == [100, 100]  # 7 ended: read from where it began
    assert fetch(c, set(), {}) == [500, 500]
    assert c.tracked == 0


def test_a_long_transaction_does_not_hold_the_cursors_back_while_it_runs() -> None:
    c = FetchCursors()
    fetch(c, {5}, {0: 1000, 1: 1000})  # xid 5: a report open from the start
    for i in range(2, 50):
        after = fetch(c, {5, 100 + i}, {0: 1000 * i, 1: 1000 * i})  # and a short writer each
        assert after[0] >= 1000 * (i - 3), (i, after)
    assert fetch(c, {149}, {0: 50_000, 1: 50_000}) == [0, 0]  # the report ended
    assert fetch(c, set(), {0: 51_000}) == [47_000, 47_000]  # and so did writer 149


def test_stale_when_a_remembered_transaction_ends_during_the_fetch() -> None:
    c = FetchCursors()
    fetch(c, {9}, {0: 100, 1: 100})  # 9 remembered with cursors 0
    fetch(c, {9}, {0: 200, 1: 200})
    after = c.plan({9}, SHARDS)
    assert after == [100, 100]
    assert c.may_go_stale(SHARDS, after) is True  # 9's rows may lie below 100
    assert c.stale({9}, SHARDS, after) is False
    assert c.stale(set(), SHARDS, after) is True  # 9 ended between the list and the fetch
    assert c.plan(set(), SHARDS) == [0, 0]  # planned again: read from where 9 began
    # a transaction first listed at this fetch is never stale: its rows lie above the start
    d = FetchCursors()
    fetch(d, set(), {0: 100, 1: 100})
    fetch(d, set(), {0: 200, 1: 200})
    after = d.plan({11}, SHARDS)
    assert d.may_go_stale(SHARDS, after) is False  # no need to list again after this fetch
    assert d.stale(set(), SHARDS, after) is False


def test_held_back_rows_reset_and_from_start() -> None:
    c = FetchCursors()
    fetch(c, set(), {0: 100, 1: 100})
    c.plan(set(), SHARDS)
    c.advance(SHARDS, {0: 150, 1: 150}, {1: 42})  # shard 1: row 42 fetched but held back
    c.plan(set(), SHARDS)
    c.advance(SHARDS, {}, {})
    assert c.plan(set(), SHARDS, from_start=[0]) == [0, 41]
    c.reset(1)
    assert c.plan(set(), SHARDS) == [150, 0]
    c.clear()
    assert not c.active
    assert c.plan(set(), SHARDS) == [0, 0]


def test_a_statement_that_takes_a_transaction_id_keeps_where_it_began() -> None:
    """An INSERT takes its outbox id before its transaction id: listed first as a statement
    without one (negative, with its pid), then by its transaction id. When it ends, the read
    starts from where the statement was first seen, not where the transaction id was."""
    c = FetchCursors()
    fetch(c, set(), {0: 100, 1: 100})
    fetch(c, set(), {0: 200, 1: 200})
    after = c.plan({-7: 42}, SHARDS)  # pid 42, in its INSERT: its id may be anything > 100
    c.advance(SHARDS, {0: 300, 1: 300}, {})
    assert after == [100, 100]
    for top in (400, 500):
        c.plan({9: 42}, SHARDS)  # the same session now holds transaction id 9
        c.advance(SHARDS, {0: top, 1: top}, {})
    assert c.plan({}, SHARDS) == [100, 100]  # 9 committed: read from where its INSERT began


def test_a_transaction_id_of_another_session_starts_fresh() -> None:
    c = FetchCursors()
    fetch(c, set(), {0: 100, 1: 100})
    fetch(c, set(), {0: 200, 1: 200})
    c.plan({-7: 42}, SHARDS)
    c.advance(SHARDS, {0: 300, 1: 300}, {})
    c.plan({9: 43}, SHARDS)  # pid 43: not the statement of pid 42
    c.advance(SHARDS, {0: 400, 1: 400}, {})
    c.plan({9: 43}, SHARDS)
    c.advance(SHARDS, {0: 500, 1: 500}, {})
    assert c.plan({}, SHARDS) == [200, 200]  # where 9 was first seen


class _ScriptedStore:
    """The three statements of a fetch with cursors, answered from a script."""

    def __init__(self, held_running: dict[int, int], lists: list[dict[int, int]]) -> None:
        self.held_running = held_running
        self.lists = lists
        self.reads: list[list[int]] = []

    def held(self, *_args: object, **_kw: object) -> tuple[list[int], list[str], dict[int, int]]:
        return [], [], self.held_running

    def fetch(self, _conn: object, _shards: object, _blocked: object, _limit: object,
              after: list[int], _skip: object = ()) -> list[object]:
        self.reads.append(list(after))
        return []

    def running_xids(self, _conn: object) -> dict[int, int]:
        return self.lists.pop(0)


def _relay_without_a_database() -> Relay:
    """A relay whose fetches go to a :class:`_ScriptedStore` set by the test; no rescans."""

    class _Sink:
        name = "test"

        def publish(self, rows: object, timeout: float) -> list[Outcome]:
            return []

    relay = Relay(load_settings(database_url="postgresql://u@127.0.0.1/db",
                                rescan_interval=3600), _Sink())  # type: ignore[arg-type]
    relay._next_rescan = float("inf")
    relay._work = object()  # type: ignore[assignment]
    return relay


def test_a_transaction_ending_during_the_second_fetch_makes_a_third() -> None:
    """Two transactions seen in earlier rounds are still running when round 4 lists: the
    younger ends during the fetch (so it is read again from lower), the older during that
    second fetch: a third fetch must read below both, before anything is published."""
    relay = _relay_without_a_database()
    c = relay._cursors
    shard = [0]
    c.plan({}, shard)
    c.advance(shard, {0: 10}, {})
    c.plan({99: 1}, shard)  # txn 99 appears: its rows may lie above nothing read yet
    c.advance(shard, {0: 20}, {})
    c.plan({99: 1, 100: 2}, shard)  # txn 100 appears: its rows lie above 10
    c.advance(shard, {0: 30}, {})
    store = _ScriptedStore({99: 1, 100: 2}, [{99: 1}, {}])  # 100 ends, then 99 ends
    relay.store = store  # type: ignore[assignment]
    relay._fetch(shard, 100)
    assert store.reads == [[20], [10], [0]]


def test_after_three_stale_fetches_the_read_starts_below_the_remembered_not_at_zero() -> None:
    """Four transactions seen in earlier rounds, the youngest ending during each fetch: the
    fourth fetch reads from below those still remembered (the oldest's rows lie above 100),
    not each shard from its start (which walks every row deleted since the last vacuum)."""
    from outbox_relay.relay import MAX_REFETCHES

    relay = _relay_without_a_database()
    c = relay._cursors
    shard = [0]
    running: dict[int, int] = {}
    for n, top in enumerate((100, 200, 300, 400, 500, 600)):
        if n >= 2:
            running[n + 3] = n + 3  # txn 5 is first seen at the third fetch, 6 at the fourth...
        c.plan(dict(running), shard)
        c.advance(shard, {0: top}, {})
    lists = [{5: 5, 6: 6, 7: 7}, {5: 5, 6: 6}, {5: 5}]  # 8, then 7, then 6 end
    store = _ScriptedStore(dict(running), lists)
    relay.store = store  # type: ignore[assignment]
    relay._fetch(shard, 100)
    assert len(store.reads) == MAX_REFETCHES + 1
    assert store.reads[:3] == [[500], [400], [300]]  # each from where the ended one's rows lie
    assert store.reads[3] == [100], "below txn 5, still running; not from the shard's start"
