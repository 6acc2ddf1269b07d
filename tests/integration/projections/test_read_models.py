"""customer_stats, daily_sales and sku_sales against figures summed from the commands issued."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import inspect, select

from domain.ledger import OrderLedger
from domain.money import MAX_AMOUNT
from projections.base import generation_suffix
from projections.customer_stats import CustomerSpend, CustomerStats, get_customer_stats
from projections.daily_sales import DailySales, daily_sales_between
from projections.engine.runtime import ProjectionRuntime
from projections.sku_sales import SkuSales, top_skus
from tests.integration.projections.conftest import CatchUp
from tests.support.orders import (
    CANCELLED,
    CUSTOMERS,
    LINE_ADDED,
    LINE_REMOVED,
    PAYMENT,
    PLACED,
    REFUND,
    IssuedCommand,
    OrderMix,
)
from tests.support.projections import LedgerClock, checksum, table_contents, utc

READ_MODELS = ("customer_stats", "daily_sales", "sku_sales")
HANDLED = {
    "customer_stats": {PLACED, PAYMENT, REFUND},
    "daily_sales": {PLACED, LINE_ADDED, LINE_REMOVED, PAYMENT, REFUND, CANCELLED},
    "sku_sales": {PLACED, LINE_ADDED, LINE_REMOVED, CANCELLED},
}
"""The commands whose events each read model reads."""

# -- what the read models should hold, summed from the commands the test issued ---------------


Customers = tuple[
    dict[str, tuple[int, datetime, datetime]], dict[tuple[str, str], tuple[int, int, int]]
]


def expected_customers(log: Sequence[IssuedCommand]) -> Customers:
    """Per customer (orders, first, last) and per (customer, currency) the money figures."""
    stats: dict[str, tuple[int, datetime, datetime]] = {}
    spend: dict[tuple[str, str], list[int]] = {}
    for command in log:
        key = (command.customer_id, command.currency)
        if command.kind == PLACED:
            orders, first, last = stats.get(command.customer_id, (0, command.at, command.at))
            stats[command.customer_id] = (orders + 1, min(first, command.at), max(last, command.at))
            spend.setdefault(key, [0, 0])
        elif command.kind == PAYMENT:
            spend[key][0] += command.amount
        elif command.kind == REFUND:
            spend[key][1] += command.amount
    return stats, {key: (c, r, c - r) for key, (c, r) in spend.items()}


def expected_days(log: Sequence[IssuedCommand]) -> dict[tuple[date, str], tuple[int, ...]]:
    """(UTC day, currency) -> orders placed, gross, captured, refunded, net, cancellations."""
    days: dict[tuple[date, str], Counter[str]] = {}
    for command in log:
        if command.kind not in (PLACED, LINE_ADDED, LINE_REMOVED, PAYMENT, REFUND, CANCELLED):
            continue
        day = days.setdefault((command.at.astimezone(UTC).date(), command.currency), Counter())
        amount = sum(quantity * price for _, quantity, price in command.lines)
        if command.kind == PLACED:
            day["orders"] += 1
            day["gross"] += amount
        elif command.kind == LINE_ADDED:
            day["gross"] += amount
        elif command.kind == LINE_REMOVED:
            day["gross"] -= amount
        elif command.kind == PAYMENT:
            day["captured"] += command.amount
        elif command.kind == REFUND:
            day["refunded"] += command.amount
        else:
            day["cancellations"] += 1
    return {
        key: (
            d["orders"],
            d["gross"],
            d["captured"],
            d["refunded"],
            d["captured"] - d["refunded"],
            d["cancellations"],
        )
        for key, d in days.items()
    }


def expected_skus(log: Sequence[IssuedCommand]) -> dict[tuple[str, str], tuple[int, ...]]:
    """(SKU, currency) -> units ordered, units cancelled, net units, revenue."""
    skus: dict[tuple[str, str], Counter[str]] = {}
    for command in log:
        for sku, quantity, price in command.lines:
            row = skus.setdefault((sku, command.currency), Counter())
            if command.kind in (PLACED, LINE_ADDED):
                row["ordered"] += quantity
                row["revenue"] += quantity * price
            elif command.kind == LINE_REMOVED:
                row["ordered"] -= quantity
                row["revenue"] -= quantity * price
            elif command.kind == CANCELLED:
                row["cancelled"] += quantity
                row["revenue"] -= quantity * price
    return {
        key: (r["ordered"], r["cancelled"], r["ordered"] - r["cancelled"], r["revenue"])
        for key, r in skus.items()
    }


# -- what the read models hold ------------------------------------------------------------------


def rows(runtime: ProjectionRuntime, name: str, base: str) -> list[dict[str, Any]]:
    with runtime.reading(name) as (conn, tables):
        return [dict(row._mapping) for row in conn.execute(select(tables[base]))]


def actual_customers(runtime: ProjectionRuntime) -> Customers:
    stats = {
        r["customer_id"]: (r["orders"], utc(r["first_order_at"]), utc(r["last_order_at"]))
        for r in rows(runtime, "customer_stats", "customer_stats")
    }
    spend = {
        (r["customer_id"], r["currency"]): (r["captured"], r["refunded"], r["net"])
        for r in rows(runtime, "customer_stats", "customer_spend")
    }
    return stats, spend


def actual_days(runtime: ProjectionRuntime) -> dict[tuple[date, str], tuple[int, ...]]:
    columns = ("orders_placed", "gross", "captured", "refunded", "net", "cancellations")
    return {
        (r["day"], r["currency"]): tuple(r[c] for c in columns)
        for r in rows(runtime, "daily_sales", "daily_sales")
    }


def actual_skus(runtime: ProjectionRuntime) -> dict[tuple[str, str], tuple[int, ...]]:
    columns = ("units_ordered", "units_cancelled", "net_units", "revenue")
    return {
        (r["sku"], r["currency"]): tuple(r[c] for c in columns)
        for r in rows(runtime, "sku_sales", "sku_sales")
    }


def assert_read_models_match(runtime: ProjectionRuntime, log: Sequence[IssuedCommand]) -> None:
    assert actual_customers(runtime) == expected_customers(log)
    assert actual_days(runtime) == expected_days(log)
    assert actual_skus(runtime) == expected_skus(log)


# -- tests --------------------------------------------------------------------------------------


class TestReadModelsAgreeWithTheLedger:
    def test_every_read_model_matches_sums_over_the_commands_issued(
        self, order_mix: OrderMix, runtime: ProjectionRuntime, catch_up: CatchUp
    ) -> None:
        """Every row of every read model equals what the issued commands add up to."""
        # Two rounds, so the second folds into rows the first one wrote.
        order_mix.place(24)
        catch_up()
        order_mix.place(16)
        catch_up()

        log = order_mix.log
        # The mix really covers what the read models distinguish.
        assert {c.kind for c in log} >= {PLACED, LINE_ADDED, LINE_REMOVED, PAYMENT, REFUND}
        assert {c.kind for c in log} >= {CANCELLED, "shipped", "delivered"}
        assert {c.currency for c in log} == {"EUR", "USD", "GBP", "JPY"}
        assert len({c.at.date() for c in log}) >= 4
        assert any(len({c.currency for c in log if c.customer_id == x}) > 1 for x in CUSTOMERS)
        assert_read_models_match(runtime, log)

    def test_queries_answer_from_the_read_models(
        self, order_mix: OrderMix, runtime: ProjectionRuntime, catch_up: CatchUp
    ) -> None:
        """A customer's stats, days between two dates and the top SKUs read the right rows."""
        log = order_mix.place(24)
        catch_up(list(READ_MODELS))
        stats, spend = expected_customers(log)
        days = expected_days(log)
        skus = expected_skus(log)

        with runtime.reading("customer_stats") as (conn, tables):
            for customer, (orders, first, last) in stats.items():
                assert get_customer_stats(conn, tables, customer) == CustomerStats(
                    customer_id=customer,
                    orders=orders,
                    first_order_at=first,
                    last_order_at=last,
                    spend=[
                        CustomerSpend(currency, *figures)
                        for (who, currency), figures in sorted(spend.items())
                        if who == customer
                    ],
                )
            assert get_customer_stats(conn, tables, "cust-nobody") is None

        first_day, last_day = min(d for d, _ in days), max(d for d, _ in days)
        all_days = [DailySales(day, cur, *figures) for (day, cur), figures in sorted(days.items())]
        with runtime.reading("daily_sales") as (conn, tables):
            assert daily_sales_between(conn, tables, first_day, last_day) == all_days
            middle = first_day + timedelta(days=1)
            assert daily_sales_between(conn, tables, middle, middle, currency="JPY") == [
                s for s in all_days if s.day == middle and s.currency == "JPY"
            ]
            assert daily_sales_between(conn, tables, first_day, last_day, currency="EUR") == [
                s for s in all_days if s.currency == "EUR"
            ]
            before = first_day - timedelta(days=10)
            assert daily_sales_between(conn, tables, before, before + timedelta(days=9)) == []
            with pytest.raises(ValueError, match="before the start"):
                daily_sales_between(conn, tables, last_day, first_day)

        ranked = [
            SkuSales(sku, cur, *figures)
            for (sku, cur), figures in sorted(skus.items(), key=lambda i: (-i[1][2], i[0]))
        ]
        with runtime.reading("sku_sales") as (conn, tables):
            assert top_skus(conn, tables, limit=3) == ranked[:3]
            assert top_skus(conn, tables, limit=1000) == ranked
            assert top_skus(conn, tables, limit=1000, currency="JPY") == [
                s for s in ranked if s.currency == "JPY"
            ]
            with pytest.raises(ValueError, match="at least 1"):
                top_skus(conn, tables, limit=0)


class TestBatching:
    def test_batch_size_does_not_change_any_table(
        self, order_mix: OrderMix, runtime: ProjectionRuntime, catch_up: CatchUp
    ) -> None:
        """Batches of 1, 7 and 1000 events leave identical rows in every table."""
        names = [p.name for p in runtime.projections]
        log = order_mix.place(16)
        catch_up(batch_size=1)
        one_by_one = {name: table_contents(runtime, name) for name in names}
        assert all(table for name in READ_MODELS for table in one_by_one[name].values())
        assert_read_models_match(runtime, log)

        # Batches of 7 really hold an order's placement together with its later events.
        for kinds in HANDLED.values():
            stream = [c for c in log if c.kind in kinds]
            chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]
            assert any(_placed_and_followed(chunk) for chunk in chunks), kinds

        for size in (7, 1000):
            for name in names:
                runtime.catalog.start_rebuild(name, target=runtime.source.head())
            catch_up(batch_size=size)
            assert {name: table_contents(runtime, name) for name in names} == one_by_one, size


class TestRebuild:
    def test_a_rebuild_reproduces_every_table_in_a_newer_generation(
        self, order_mix: OrderMix, runtime: ProjectionRuntime, catch_up: CatchUp
    ) -> None:
        """A rebuilt generation serves the same rows under a higher number; the old one is gone."""
        names = [p.name for p in runtime.projections]
        order_mix.place(24)
        catch_up()
        before = {name: _serving(runtime, name) for name in names}
        sums = {name: checksum(table_contents(runtime, name)) for name in names}

        for name in names:
            runtime.catalog.start_rebuild(name, target=runtime.source.head())
        catch_up()

        existing = set(inspect(runtime.engine).get_table_names())
        for name in names:
            generation = _serving(runtime, name)
            assert generation > before[name]
            assert checksum(table_contents(runtime, name)) == sums[name]
            old_tables = runtime.catalog.tables(name, before[name])
            assert not {t.name for t in old_tables.values()} & existing
            new_tables = runtime.catalog.tables(name, generation)
            assert all(t.name.endswith(generation_suffix(generation)) for t in new_tables.values())


def _placed_and_followed(chunk: Sequence[IssuedCommand]) -> bool:
    placed = {c.order_id for c in chunk if c.kind == PLACED}
    return any(c.order_id in placed and c.kind != PLACED for c in chunk)


def _serving(runtime: ProjectionRuntime, name: str) -> int:
    row = runtime.catalog.serving(name)
    assert row is not None
    return row.generation


class TestDailySales:
    def test_sales_count_toward_the_utc_date_of_the_event(
        self,
        ledger: OrderLedger,
        ledger_clock: LedgerClock,
        runtime: ProjectionRuntime,
        catch_up: CatchUp,
    ) -> None:
        """An order placed at 01:30 on 1 May in Tokyo is a sale of 30 April (UTC)."""
        ledger_clock.now = datetime(2024, 5, 1, 1, 30, tzinfo=timezone(timedelta(hours=9)))
        order = ledger.place_order(
            customer_id="cust-chiyo",
            currency="JPY",
            lines=[{"sku": "TEA-SENCHA-100G", "quantity": 2, "unit_price": 1800}],
        ).order_id
        ledger_clock.now = datetime(2024, 5, 1, 0, 5, tzinfo=UTC)
        ledger.capture_payment(order, amount=3600, payment_reference="pay-1")
        catch_up(["daily_sales"])

        with runtime.reading("daily_sales") as (conn, tables):
            assert daily_sales_between(conn, tables, date(2024, 4, 1), date(2024, 5, 31)) == [
                DailySales(date(2024, 4, 30), "JPY", 1, 3600, 0, 0, 0, 0),
                DailySales(date(2024, 5, 1), "JPY", 0, 0, 3600, 0, 3600, 0),
            ]

    def test_lines_changed_on_a_later_day_adjust_that_days_gross(
        self,
        ledger: OrderLedger,
        ledger_clock: LedgerClock,
        runtime: ProjectionRuntime,
        catch_up: CatchUp,
    ) -> None:
        """Gross is placed totals on the day placed, then line changes on the day they happen."""
        ledger_clock.now = datetime(2024, 6, 3, 22, 0, tzinfo=UTC)
        order = ledger.place_order(
            customer_id="cust-alice",
            currency="EUR",
            lines=[
                {"sku": "TEA-SENCHA-100G", "quantity": 2, "unit_price": 1250},
                {"sku": "MUG-STONEWARE", "quantity": 1, "unit_price": 2490},
            ],
        ).order_id
        ledger_clock.now = datetime(2024, 6, 4, 9, 0, tzinfo=UTC)
        ledger.remove_line(order, sku="MUG-STONEWARE")
        ledger.add_line(order, sku="FILTER-PAPER-100", quantity=1, unit_price=399)
        ledger_clock.now = datetime(2024, 6, 5, 9, 0, tzinfo=UTC)
        ledger.cancel_order(order, reason="ordered twice")
        catch_up(["daily_sales"])

        with runtime.reading("daily_sales") as (conn, tables):
            assert daily_sales_between(conn, tables, date(2024, 6, 1), date(2024, 6, 30)) == [
                DailySales(date(2024, 6, 3), "EUR", 1, 4990, 0, 0, 0, 0),
                DailySales(date(2024, 6, 4), "EUR", 0, -2490 + 399, 0, 0, 0, 0),
                DailySales(date(2024, 6, 5), "EUR", 0, 0, 0, 0, 0, 1),
            ]


class TestSkuSales:
    def test_cancelling_moves_the_orders_current_lines_to_units_cancelled(
        self, ledger: OrderLedger, runtime: ProjectionRuntime, catch_up: CatchUp
    ) -> None:
        """Only lines on the order when it is cancelled count as cancelled and leave revenue."""
        cancelled = ledger.place_order(
            customer_id="cust-bruno",
            currency="USD",
            lines=[
                {"sku": "MUG-STONEWARE", "quantity": 3, "unit_price": 2699},
                {"sku": "CADDY-TIN", "quantity": 2, "unit_price": 1200},
            ],
        ).order_id
        ledger.add_line(cancelled, sku="SCOOP-BRASS", quantity=1, unit_price=820)
        ledger.remove_line(cancelled, sku="MUG-STONEWARE")
        ledger.cancel_order(cancelled, reason="out of stock")
        ledger.place_order(
            customer_id="cust-farah",
            currency="USD",
            lines=[{"sku": "CADDY-TIN", "quantity": 5, "unit_price": 1200}],
        )
        catch_up(["sku_sales"])

        with runtime.reading("sku_sales") as (conn, tables):
            assert top_skus(conn, tables, limit=10) == [
                SkuSales("CADDY-TIN", "USD", 7, 2, 5, 5 * 1200),
                SkuSales("MUG-STONEWARE", "USD", 0, 0, 0, 0),
                SkuSales("SCOOP-BRASS", "USD", 1, 1, 0, 0),
            ]


class TestCustomerStats:
    def test_spend_is_kept_per_currency_net_of_refunds(
        self,
        ledger: OrderLedger,
        ledger_clock: LedgerClock,
        runtime: ProjectionRuntime,
        catch_up: CatchUp,
    ) -> None:
        """Payments and refunds land on the currency of their order; orders count in every one."""
        placed_first = ledger_clock.now
        euros = ledger.place_order(
            customer_id="cust-dmitri",
            currency="EUR",
            lines=[{"sku": "KETTLE-CAST-IRON", "quantity": 1, "unit_price": 8900}],
        ).order_id
        ledger_clock.advance(days=2)
        yen = ledger.place_order(
            customer_id="cust-dmitri",
            currency="JPY",
            lines=[{"sku": "TRAY-WALNUT", "quantity": 2, "unit_price": 7200}],
        ).order_id
        ledger.capture_payment(euros, amount=8900, payment_reference="eur-1")
        ledger.capture_payment(yen, amount=14400, payment_reference="jpy-1")
        ledger.issue_refund(yen, amount=400, reason="scratched")
        catch_up(["customer_stats"])

        with runtime.reading("customer_stats") as (conn, tables):
            assert get_customer_stats(conn, tables, "cust-dmitri") == CustomerStats(
                customer_id="cust-dmitri",
                orders=2,
                first_order_at=placed_first,
                last_order_at=placed_first + timedelta(days=2),
                spend=[
                    CustomerSpend("EUR", 8900, 0, 8900),
                    CustomerSpend("JPY", 14400, 400, 14000),
                ],
            )

    def test_the_largest_accepted_orders_add_up_in_every_read_model(
        self, ledger: OrderLedger, catch_up: CatchUp, runtime: ProjectionRuntime
    ) -> None:
        """Orders at the largest total, one customer, day and SKU, paid and partly refunded:
        every sum is exact and no projection stops (64-bit sums cannot overflow)."""
        orders = [
            ledger.place_order(
                customer_id="cust-whale",
                currency="EUR",
                lines=[{"sku": "YACHT", "quantity": 1, "unit_price": MAX_AMOUNT}],
            ).order_id
            for _ in range(3)
        ]
        for number, order_id in enumerate(orders):
            ledger.capture_payment(order_id, amount=MAX_AMOUNT, payment_reference=f"p-{number}")
        ledger.issue_refund(orders[0], amount=MAX_AMOUNT, reason="returned")

        catch_up()

        with runtime.reading("customer_stats") as (conn, tables):
            stats = get_customer_stats(conn, tables, "cust-whale")
        assert stats is not None
        assert stats.spend == [CustomerSpend("EUR", 3 * MAX_AMOUNT, MAX_AMOUNT, 2 * MAX_AMOUNT)]
        with runtime.reading("sku_sales") as (conn, tables):
            (yacht,) = top_skus(conn, tables, limit=1)
        assert (yacht.sku, yacht.revenue) == ("YACHT", 3 * MAX_AMOUNT)
