"""Which transactions a PostgreSQL snapshot says had ended."""

from __future__ import annotations

from domain.eventstore import Snapshot


def test_a_snapshot_reads_and_writes_postgresqls_text_form() -> None:
    snapshot = Snapshot.parse("10:20:15,10")
    assert snapshot == Snapshot(10, 20, frozenset({10, 15}))
    assert str(snapshot) == "10:20:10,15"
    assert Snapshot.parse("7:7:") == Snapshot(7, 7, frozenset())


def test_ended_are_those_below_xmax_that_were_not_running() -> None:
    snapshot = Snapshot.parse("10:20:10,15")
    ended = [tx for tx in (0, 9, 10, 11, 15, 19, 20, 25) if snapshot.ended(tx)]
    assert ended == [0, 9, 11, 19]
