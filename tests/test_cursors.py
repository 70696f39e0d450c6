"""Fetch cursors as pure logic: where each shard's next read starts, given snapshots.

The relay tests (`test_relay.py`) run the same logic against real transactions."""

from __future__ import annotations

from outbox_relay.cursors import FetchCursors, Snapshot


def snap(xmin: int, xmax: int, *xip: int) -> Snapshot:
    return Snapshot(xmin, xmax, frozenset(xip))


def test_snapshot_parse_and_ended() -> None:
    s = Snapshot.parse("100:110:102,105")
    assert s == snap(100, 110, 102, 105)
    assert Snapshot.parse("7:7:") == snap(7, 7)
    assert s.ended(99) and s.ended(103) and s.ended(109)
    assert not s.ended(102) and not s.ended(105) and not s.ended(110) and not s.ended(200)


def test_quiet_table_the_cursor_follows_the_last_row() -> None:
    c = FetchCursors()
    assert c.plan(snap(10, 10), [0, 1]) == [0, 0]
    c.advance({0: 50, 1: 40}, {})
    assert c.plan(snap(11, 11), [0, 1]) == [50, 40]
    c.advance({0: 90}, {})
    assert c.plan(snap(12, 12), [0, 1]) == [90, 40]


def test_a_transaction_running_at_a_fetch_pulls_the_cursor_back_when_it_ends() -> None:
    """Its rows were numbered after the fetch *before* the one that first saw it running."""
    c = FetchCursors()
    c.plan(snap(10, 10), [0])
    c.advance({0: 100}, {})  # fetch 1: rows up to 100
    c.plan(snap(20, 21, 20), [0])  # fetch 2 sees xid 20 running (it may hold id 101..)
    c.advance({0: 200}, {})
    assert c.plan(snap(20, 22, 20), [0]) == [200]  # still running: the cursor moves on
    c.advance({0: 300}, {})
    # xid 20 committed: read from where the cursors stood before the fetch before it appeared
    assert c.plan(snap(22, 22), [0]) == [0]
    c.advance({0: 310}, {})
    assert c.plan(snap(23, 23), [0]) == [310]


def test_margin_of_one_fetch_for_an_id_taken_before_the_snapshot() -> None:
    c = FetchCursors()
    c.plan(snap(1, 1), [0])
    c.advance({0: 100}, {})
    c.plan(snap(2, 2), [0])
    c.advance({0: 200}, {})
    c.plan(snap(3, 3), [0])
    c.advance({0: 300}, {})
    c.plan(snap(4, 5, 4), [0])  # first seen now: remembered with the cursor before the last fetch
    c.advance({0: 400}, {})
    assert c.plan(snap(5, 5), [0]) == [200]


def test_a_long_transaction_does_not_hold_the_cursors_back_while_it_runs() -> None:
    c = FetchCursors()
    c.plan(snap(5, 6, 5), [0])  # xid 5: a report holding the horizon from the start
    for i in range(1, 50):
        c.advance({0: 1000 * i}, {})
        after = c.plan(snap(5, 6 + i, 5, 6 + i), [0])  # and one short writer each round
        assert after[0] >= 1000 * (i - 2), (i, after)  # short writers pull it back 2 rounds
    assert c.tracked >= 1
    c.advance({0: 60_000}, {})
    assert c.plan(snap(100, 100), [0]) == [0]  # the report ended: one read from the start
    c.advance({0: 61_000}, {})
    assert c.plan(snap(101, 101), [0]) == [61_000]
    assert c.tracked == 0


def test_held_back_rows_reset_and_from_start() -> None:
    c = FetchCursors()
    c.plan(snap(1, 1), [0, 1, 2])
    c.advance({0: 100, 1: 100, 2: 100}, {1: 42})  # shard 1: row 42 fetched but held back
    assert c.plan(snap(2, 2), [0, 1, 2], from_start=[2]) == [100, 41, 0]
    c.reset(0)
    assert c.plan(snap(3, 3), [0, 1, 2]) == [0, 41, 100]
    c.clear()
    assert not c.active
    assert c.plan(snap(4, 4), [0, 1, 2]) == [0, 0, 0]
