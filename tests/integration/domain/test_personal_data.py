"""Personal data is sealed per customer, and erasing a customer leaves nothing readable.

On SQLite and on PostgreSQL: the stored bytes hold no personal value, the ledger reads them
back, an erasure turns them into a placeholder everywhere while totals and hash chains stay,
and a missing or wrong master key stops the ledger from opening.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from sqlalchemy import select

from api.bootstrap import open_ledger
from api.settings import Settings
from domain.ledger import OrderLedger
from domain.personal import ERASED, KEY_READER, MasterKeyError, data_keys, new_master_key
from projections.engine.runtime import ProjectionRuntime
from projections.verify import verify_store
from tests.support.projections import run_until_caught_up
from tests.support.raw_events import RawEvents
from tests.support.waiting import wait_for

LINE = {"sku": "SKU-1", "quantity": 2, "unit_price": 1500}
PERSONAL = {
    "customer_email": "ana.lopez@example.com",
    "shipping_address": "Calle Mayor 7, 28013 Madrid",
    "client_reference": "ana-birthday-gift",
}
TRACKING = "TRK-ANA-000123"
SECRETS = [value.encode() for value in (*PERSONAL.values(), TRACKING)]


def record(ledger: OrderLedger, customer_id: str = "cust-ana") -> Any:
    placed = ledger.place_order(customer_id=customer_id, currency="EUR", lines=[LINE], **PERSONAL)
    ledger.capture_payment(placed.order_id, amount=3000, payment_reference="psp-1")
    ledger.ship_order(placed.order_id, carrier="DHL", tracking_number=TRACKING)
    return placed.order_id


def stored_bytes(ledger: OrderLedger, url: str) -> bytes:
    return b"".join(row[4] for row in RawEvents(url, ledger.recorder.events_table_name).rows())


class TestSealed:
    def test_the_store_holds_no_personal_value_and_the_ledger_reads_them_back(
        self, ledger: OrderLedger, store_url: str
    ) -> None:
        order_id = record(ledger)

        stored = stored_bytes(ledger, store_url)
        assert b"cust-ana" in stored and b"DHL" in stored  # pseudonymous id and carrier: plain
        for secret in SECRETS:
            assert secret not in stored
        order = ledger.get_order(order_id)
        assert {name: getattr(order, name) for name in PERSONAL} == PERSONAL
        assert order.tracking_number == TRACKING
        placed = ledger.order_history(order_id)[0]
        assert placed.data["shipping_address"] == PERSONAL["shipping_address"]

    def test_without_a_master_key_nothing_personal_is_recorded(self, store_url: str) -> None:
        bare = OrderLedger.from_url(store_url)
        try:
            with pytest.raises(MasterKeyError, match="ORDERLEDGER_MASTER_KEY"):
                bare.place_order(customer_id="c-1", currency="EUR", lines=[LINE], **PERSONAL)
            assert bare.head_position() == 0
            # An order with no personal data needs no key.
            assert bare.place_order(customer_id="c-1", currency="EUR", lines=[LINE]).version == 1
        finally:
            bare.close()


class TestErasure:
    def test_erased_values_read_as_a_placeholder_and_nothing_else_changes(
        self, ledger: OrderLedger, runtime: ProjectionRuntime
    ) -> None:
        erased = record(ledger, "cust-ana")
        kept = record(ledger, "cust-ben")
        before = ledger.get_order(erased)

        result = ledger.erase_customer("cust-ana", reason="asked by email, ticket 42")

        assert result.keys_erased == 1
        after = ledger.get_order(erased)
        for name in (*PERSONAL, "tracking_number"):
            assert getattr(after, name) == ERASED
        for name in ("total", "captured", "status", "customer_id", "currency", "carrier"):
            assert getattr(after, name) == getattr(before, name)
        assert ledger.get_order(erased, version=1).shipping_address == ERASED
        assert ledger.order_history(erased)[0].data["shipping_address"] == ERASED
        assert ledger.get_order(kept).shipping_address == PERSONAL["shipping_address"]

        run_until_caught_up(runtime, ["audit_log"])
        report = verify_store(runtime)
        assert report.ok, report.problem

    def test_is_recorded_with_who_and_why_and_can_be_repeated(self, ledger: OrderLedger) -> None:
        record(ledger)
        first = ledger.erase_customer("cust-ana", reason="GDPR art. 17 request")
        again = ledger.erase_customer("cust-ana", reason="asked again")
        assert (first.keys_erased, again.keys_erased) == (1, 0)
        assert again.position > first.position

    def test_a_later_order_gets_a_new_key_and_the_old_ones_stay_erased(
        self, ledger: OrderLedger
    ) -> None:
        old = record(ledger)
        ledger.erase_customer("cust-ana", reason="erase")
        new = record(ledger)
        assert ledger.get_order(new).shipping_address == PERSONAL["shipping_address"]
        assert ledger.get_order(old).shipping_address == ERASED

    def test_takes_effect_in_another_process_within_the_cache_time(
        self, ledger: OrderLedger, store_url: str
    ) -> None:
        order_id = record(ledger)
        other = open_ledger(Settings(database_url=store_url, personal_key_cache_ttl=0.3))
        try:
            assert other.get_order(order_id).shipping_address == PERSONAL["shipping_address"]
            ledger.erase_customer("cust-ana", reason="erase")
            wait_for(
                lambda: other.get_order(order_id).shipping_address == ERASED,
                "the other process to read the address as erased",
                timeout=5,
            )
        finally:
            other.close()


class TestKeyReads:
    def test_a_returning_customers_key_is_read_once_per_process(self, store_url: str) -> None:
        """Past the check interval with no erasure, the cached key still seals: the process
        reads the count of erasures, not the key."""
        # A second record must fit in one interval, even on a loaded machine.
        ledger = open_ledger(Settings(database_url=store_url, personal_key_cache_ttl=1.0))
        assert ledger.personal is not None
        reads = ledger.personal.reads
        try:
            record(ledger)
            time.sleep(1.1)
            before = reads.copy()
            order_id = record(ledger)

            assert reads["customer's key"] == before["customer's key"]
            assert reads["key"] == before["key"]
            assert reads["erasures"] == before["erasures"] + 1
            assert ledger.get_order(order_id).shipping_address == PERSONAL["shipping_address"]
        finally:
            ledger.close()

    def test_connections_ended_by_the_server_are_replaced(self, postgres_url: str) -> None:
        """After a restart (here: every key-reading session terminated), reads go on."""
        ledger = open_ledger(Settings(database_url=postgres_url, personal_key_cache_ttl=0))
        try:
            order_id = record(ledger)
            assert ledger.get_order(order_id).shipping_address == PERSONAL["shipping_address"]
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                ended = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = %s",
                    (KEY_READER,),
                ).fetchone()
            assert ended is not None and ended[0] >= 1

            assert ledger.get_order(order_id).shipping_address == PERSONAL["shipping_address"]
        finally:
            ledger.close()


class TestNothingLeftInTheFiles:
    def test_sqlite_never_holds_the_values_and_loses_the_key_bytes_on_erasure(
        self, sqlite_url: str
    ) -> None:
        ledger = open_ledger(Settings(database_url=sqlite_url))
        try:
            record(ledger)
            files = [Path(sqlite_url.split(":///", 1)[1])]
            files.append(files[0].with_name(files[0].name + "-wal"))
            assert ledger.personal is not None
            with ledger.personal.engine.connect() as conn:
                wrapped = conn.execute(select(data_keys.c.wrapped_key)).scalar_one()
            written = b"".join(path.read_bytes() for path in files if path.exists())
            assert bytes(wrapped) in written  # the check can see what it looks for
            for secret in SECRETS:
                assert secret not in written

            ledger.erase_customer("cust-ana", reason="erase")

            left = b"".join(path.read_bytes() for path in files if path.exists())
            assert bytes(wrapped) not in left
        finally:
            ledger.close()


class TestTheMasterKey:
    @pytest.fixture
    def keyed_store(self, store_url: str) -> Iterator[tuple[str, str]]:
        key = new_master_key()
        ledger = open_ledger(Settings(database_url=store_url, master_key=key))
        record(ledger)
        ledger.close()
        yield store_url, key

    def test_a_wrong_key_is_refused_at_start(self, keyed_store: tuple[str, str]) -> None:
        url, _ = keyed_store
        with pytest.raises(MasterKeyError, match="ORDERLEDGER_MASTER_KEY is not the master key"):
            open_ledger(Settings(database_url=url, master_key=new_master_key()))

    @pytest.mark.parametrize("key", [None, "too-short", "zz" * 32])
    def test_a_missing_or_malformed_key_is_refused(self, store_url: str, key: str | None) -> None:
        with pytest.raises(MasterKeyError, match="ORDERLEDGER_MASTER_KEY"):
            open_ledger(Settings(database_url=store_url, master_key=key))

    def test_rotation_rewraps_the_data_keys_without_touching_events(
        self, keyed_store: tuple[str, str]
    ) -> None:
        url, old = keyed_store
        new = new_master_key()
        rotating = open_ledger(Settings(database_url=url, master_key=new, previous_master_keys=old))
        try:
            before = stored_bytes(rotating, url)
            assert rotating.personal is not None
            assert rotating.personal.rotate() == 1
            assert stored_bytes(rotating, url) == before
        finally:
            rotating.close()
        rotated = open_ledger(Settings(database_url=url, master_key=new))
        try:
            placed = RawEvents(url, rotated.recorder.events_table_name).rows()[0]
            order = rotated.get_order(UUID(str(placed[1])))
            assert order.shipping_address == PERSONAL["shipping_address"]
        finally:
            rotated.close()
        with pytest.raises(MasterKeyError):
            open_ledger(Settings(database_url=url, master_key=old))
