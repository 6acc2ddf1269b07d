"""audit verify finds every kind of tampering, done as an attacker with the owner's rights.

Each test records a few orders, lets the audit log catch up, then drops the immutability
triggers and changes the events table directly, and checks that verify names the first
broken link: its kind, position, order and version. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import pytest

from api.bootstrap import open_ledger, open_read_models
from api.settings import Settings
from domain.audit import Actor, CommandContext, acting_as
from domain.chain import GENESIS, event_hash
from domain.ledger import OrderLedger
from projections import audit_log
from projections.audit_log import Checkpoint, list_checkpoints, request_checkpoint
from projections.engine.runtime import ProjectionRuntime
from projections.verify import VerifyReport, verify_order, verify_store
from tests.support.projections import run_until_caught_up
from tests.support.raw_events import RawEvents

TESTER = Actor("key", "k_tester", "tester", "writer")
LINE = {"sku": "SKU-1", "quantity": 1, "unit_price": 1500}


def _as(request_id: str) -> CommandContext:
    return CommandContext(TESTER, request_id=request_id, correlation_id="corr-1")


@dataclass
class Shop:
    """Three orders: a with four events, b with two, c with one (the newest event)."""

    a: UUID
    b: UUID
    c: UUID
    positions: dict[UUID, list[int]]
    raw: RawEvents

    def at(self, order: UUID, version: int) -> int:
        return self.positions[order][version - 1]


def record_shop(ledger: OrderLedger, store_url: str) -> Shop:
    with acting_as(_as("req-a1")):
        a = ledger.place_order(customer_id="c-a", currency="EUR", lines=[LINE]).order_id
    with acting_as(_as("req-a2")):
        ledger.add_line(a, sku="SKU-2", quantity=1, unit_price=500)
    with acting_as(_as("req-b1")):
        b = ledger.place_order(customer_id="c-b", currency="EUR", lines=[LINE]).order_id
    with acting_as(_as("req-a3")):
        ledger.capture_payment(a, amount=2000, payment_reference="pay-a")
    with acting_as(_as("req-b2")):
        ledger.cancel_order(b, reason="changed mind")
    with acting_as(_as("req-a4")):
        ledger.ship_order(a, carrier="DHL", tracking_number="JD01")
    with acting_as(_as("req-c1")):
        c = ledger.place_order(customer_id="c-c", currency="EUR", lines=[LINE]).order_id
    positions = {
        order: [entry.position for entry in ledger.order_history(order)] for order in (a, b, c)
    }
    return Shop(a, b, c, positions, RawEvents(store_url, ledger.recorder.events_table_name))


@pytest.fixture
def shop(ledger: OrderLedger, runtime: ProjectionRuntime, store_url: str) -> Shop:
    shop = record_shop(ledger, store_url)
    run_until_caught_up(runtime, ["audit_log"])
    return shop


def broken(report: VerifyReport, kind: str, position: int, order: UUID, version: int) -> None:
    assert not report.ok, report
    problem = report.problem
    assert problem is not None
    assert (problem.kind, problem.position, problem.order_id, problem.version) == (
        kind,
        position,
        str(order),
        version,
    ), problem.detail


def _audit_table(runtime: ProjectionRuntime) -> str:
    with runtime.engine.connect() as conn:
        return runtime.catalog.serving_tables(conn, "audit_log")["audit_log"].name


def _erase_from_database(runtime: ProjectionRuntime, shop: Shop, *positions: int) -> None:
    """Delete events from the store, from the audit log and every stored checkpoint: all the
    database holds that could give the deletion away."""
    shop.raw.delete(*positions)
    listed = ", ".join(str(p) for p in positions)
    shop.raw.as_owner(
        f"DELETE FROM {_audit_table(runtime)} WHERE position IN ({listed})",
        "DELETE FROM audit_checkpoints",
    )


class TestAnUntouchedStore:
    def test_verifies_and_says_what_it_checked(
        self, shop: Shop, runtime: ProjectionRuntime
    ) -> None:
        report = verify_store(runtime)

        assert report.ok, report.problem
        assert report.events_checked == report.chained_events == 7
        assert report.aggregates_checked == 3
        assert report.chain_starts_at == shop.at(shop.a, 1)
        assert report.unchained_events == 0
        assert report.audit_log_position == report.head == shop.at(shop.c, 1)

    def test_one_order_verifies(self, shop: Shop, runtime: ProjectionRuntime) -> None:
        report = verify_order(runtime, shop.a)
        assert report.ok, report.problem
        assert (report.events_checked, report.order_id) == (4, str(shop.a))


class TestTamperingIsFound:
    def test_an_altered_payload(self, shop: Shop, runtime: ProjectionRuntime) -> None:
        shop.raw.rewrite_state(shop.at(shop.a, 3), b"pay-a", b"pay-z")

        broken(verify_store(runtime), "altered", shop.at(shop.a, 3), shop.a, 3)
        broken(verify_order(runtime, shop.a), "altered", shop.at(shop.a, 3), shop.a, 3)
        assert verify_order(runtime, shop.b).ok

    def test_altered_metadata(self, shop: Shop, runtime: ProjectionRuntime) -> None:
        shop.raw.rewrite_state(shop.at(shop.b, 2), b"req-b2", b"req-zz")

        broken(verify_store(runtime), "altered", shop.at(shop.b, 2), shop.b, 2)

    def test_a_deleted_event_inside_an_order(self, shop: Shop, runtime: ProjectionRuntime) -> None:
        shop.raw.delete(shop.at(shop.a, 2))

        # The audit log sees it first, at the deleted event's own position.
        broken(verify_store(runtime), "missing_from_store", shop.at(shop.a, 2), shop.a, 2)

    def test_a_deleted_event_inside_an_order_without_the_audit_log(
        self, shop: Shop, runtime: ProjectionRuntime
    ) -> None:
        _erase_from_database(runtime, shop, shop.at(shop.a, 2))

        broken(verify_store(runtime), "version_gap", shop.at(shop.a, 3), shop.a, 2)

    def test_an_orders_deleted_last_event(self, shop: Shop, runtime: ProjectionRuntime) -> None:
        shop.raw.delete(shop.at(shop.a, 4))

        broken(verify_store(runtime), "missing_from_store", shop.at(shop.a, 4), shop.a, 4)
        broken(verify_order(runtime, shop.a), "missing_from_store", shop.at(shop.a, 4), shop.a, 4)

    def test_a_deleted_order(self, shop: Shop, runtime: ProjectionRuntime) -> None:
        shop.raw.delete(*shop.positions[shop.b])

        broken(verify_store(runtime), "missing_from_store", shop.at(shop.b, 1), shop.b, 1)

    def test_reordered_events(self, shop: Shop, runtime: ProjectionRuntime) -> None:
        shop.raw.swap_positions(shop.at(shop.a, 2), shop.at(shop.a, 3))

        report = verify_store(runtime)
        assert report.problem is not None
        assert (report.problem.position, report.problem.order_id) == (
            shop.at(shop.a, 2),
            str(shop.a),
        )
        # Moved in the audit log too: the chain alone still finds it.
        shop.raw.swap_positions(
            shop.at(shop.a, 2), shop.at(shop.a, 3), table=_audit_table(runtime), column="position"
        )
        report = verify_store(runtime)
        assert report.problem is not None
        assert (report.problem.position, report.problem.order_id) == (
            shop.at(shop.a, 2),
            str(shop.a),
        )
        # Read by position (SQLite), version 3 comes first; read by transaction (PostgreSQL),
        # version 2 comes first, at the higher position.
        assert report.problem.kind in ("version_gap", "out_of_order")

    def test_an_event_inserted_in_the_middle_with_every_hash_recomputed(
        self, shop: Shop, runtime: ProjectionRuntime
    ) -> None:
        """A forged version 3 of order a, later versions moved up and re-chained: a valid
        chain, but not the sequence the audit log recorded."""
        raw, a = shop.raw, shop.a
        key = a.hex if raw.is_sqlite else a
        raw.as_owner(
            (
                f"UPDATE {raw.table} SET originator_version = originator_version + 100 "
                "WHERE originator_id = {p} AND originator_version >= 3",
                (key,),
            ),
            (
                f"UPDATE {raw.table} SET originator_version = originator_version - 99 "
                "WHERE originator_id = {p} AND originator_version >= 100",
                (key,),
            ),
        )
        forged = raw.state_at(shop.at(a, 2)).replace(b"SKU-2", b"SKU-9")
        topic = raw.rows()[1][3]
        rows = {row[2]: row for row in raw.rows() if str(row[1]).replace("-", "") == a.hex}
        link = {2: _stored_hash(raw, shop.at(a, 2))}
        link[3] = event_hash(link[2], a, 3, topic, forged)
        for version in (4, 5):
            link[version] = event_hash(
                link[version - 1], a, version, rows[version][3], rows[version][4]
            )
        raw.as_owner(
            (
                f"INSERT INTO {raw.table} (originator_id, originator_version, topic, state, "
                "chain_hash) VALUES ({p}, 3, {p}, {p}, {p})",
                (key, topic, forged, link[3]),
            ),
            *(
                (
                    f"UPDATE {raw.table} SET chain_hash = {{p}} "
                    "WHERE originator_id = {p} AND originator_version = {p}",
                    (link[version], key, version),
                )
                for version in (4, 5)
            ),
        )

        report = verify_store(runtime)
        assert report.problem is not None
        assert report.problem.kind == "audit_log_mismatch"
        assert report.problem.position == shop.at(a, 3)


class TestCheckpointsKeptElsewhere:
    def test_catch_an_attacker_who_rewrote_the_whole_database(
        self, shop: Shop, runtime: ProjectionRuntime
    ) -> None:
        checkpoint = _checkpoint(runtime)
        _erase_from_database(runtime, shop, *shop.positions[shop.b])

        assert verify_store(runtime).ok, "nothing left in the database shows the deletion"
        report = verify_store(runtime, [checkpoint])
        assert report.problem is not None
        assert (report.problem.kind, report.problem.position) == (
            "checkpoint_mismatch",
            checkpoint.position,
        )

    def test_catch_a_truncated_store(self, shop: Shop, runtime: ProjectionRuntime) -> None:
        checkpoint = _checkpoint(runtime)
        assert checkpoint.position == shop.at(shop.c, 1)
        _erase_from_database(runtime, shop, shop.at(shop.c, 1), shop.at(shop.a, 4))

        report = verify_store(runtime, [checkpoint])
        assert report.problem is not None
        assert (report.problem.kind, report.problem.position) == ("truncated", checkpoint.position)

    def test_an_untouched_store_matches_its_checkpoint_document(
        self, shop: Shop, runtime: ProjectionRuntime
    ) -> None:
        document = _checkpoint(runtime).document()
        report = verify_store(runtime, [Checkpoint.from_document(document)])
        assert report.ok, report.problem
        assert report.checkpoints_checked == 2  # the one recorded and the one given


class TestCheckpointsAtIntervals:
    def test_recorded_at_every_multiple_and_kept_through_a_rebuild(
        self,
        ledger: OrderLedger,
        runtime: ProjectionRuntime,
        store_url: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(audit_log, "CHECKPOINT_INTERVAL", 3)
        shop = record_shop(ledger, store_url)
        run_until_caught_up(runtime, ["audit_log"], batch_size=2)
        recorded = _checkpoints(runtime)
        head = shop.at(shop.c, 1)
        assert [c.position for c in recorded] == list(range(3, head, 3))
        assert all(c.reason == "interval" for c in recorded)

        runtime.catalog.start_rebuild("audit_log")
        run_until_caught_up(runtime, ["audit_log"])

        assert _checkpoints(runtime) == recorded
        report = verify_store(runtime)
        assert report.ok, report.problem
        assert report.checkpoints_checked == len(recorded)


class TestAStoreMadeBeforeChaining:
    def test_is_verified_from_the_first_chained_event_on(self, store_url: str) -> None:
        settings = Settings(database_url=store_url)
        ledger = open_ledger(settings)
        old = ledger.place_order(customer_id="c-old", currency="EUR", lines=[LINE])
        ledger.capture_payment(old.order_id, amount=1500, payment_reference="pay-old")
        raw = RawEvents(store_url, ledger.recorder.events_table_name)
        ledger.close()
        raw.as_owner(f"ALTER TABLE {raw.table} DROP COLUMN chain_hash")

        with _reopened(settings) as (ledger, runtime):
            shipped = ledger.ship_order(old.order_id, carrier="DHL", tracking_number="JD02")
            ledger.place_order(customer_id="c-new", currency="EUR", lines=[LINE])
            run_until_caught_up(runtime, ["audit_log"])
            report = verify_store(runtime)
            assert report.ok, report.problem
            assert (report.unchained_events, report.chained_events) == (2, 2)
            assert report.chain_starts_at == shipped.position

            raw.rewrite_state(old.position, b"c-old", b"c-odd")
            assert verify_store(runtime).ok, "events before the chain are not covered"
            raw.as_owner(
                (
                    f"UPDATE {raw.table} SET chain_hash = NULL WHERE {raw.position} = {{p}}",
                    (shipped.position,),
                )
            )
            report = verify_store(runtime)
            assert report.problem is not None
            assert report.problem.kind in {"missing_hash", "audit_log_mismatch"}


class _reopened:  # noqa: N801 - used as a context manager, like open()
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __enter__(self) -> tuple[OrderLedger, ProjectionRuntime]:
        self.ledger = open_ledger(self.settings)
        self.runtime = open_read_models(self.settings, self.ledger)
        return self.ledger, self.runtime

    def __exit__(self, *_: object) -> None:
        self.runtime.close()
        self.ledger.close()


def _stored_hash(raw: RawEvents, position: int) -> bytes:
    rows = raw._query(f"SELECT chain_hash FROM {raw.table} WHERE {raw.position} = {position}")
    return bytes(rows[0][0]) if rows[0][0] is not None else GENESIS


def _checkpoint(runtime: ProjectionRuntime) -> Checkpoint:
    found = request_checkpoint(runtime.engine, runtime.catalog.serving_tables)
    assert found is not None
    return found


def _checkpoints(runtime: ProjectionRuntime) -> list[Checkpoint]:
    with runtime.engine.connect() as conn:
        return list_checkpoints(conn)
