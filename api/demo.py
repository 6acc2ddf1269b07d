"""Demo data: realistic orders taken through every part of the lifecycle by OrderLedger."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from uuid import UUID

from domain.ledger import OrderLedger
from domain.order import OrderLine


@dataclass(frozen=True)
class Product:
    """A catalogue item with a shelf price per currency, in minor units."""

    sku: str
    name: str
    prices: Mapping[str, int]
    max_quantity: int = 1


@dataclass(frozen=True)
class Customer:
    """A returning customer who always pays in one currency."""

    customer_id: str
    currency: str
    shipping_address: str


def _prices(eur: int, usd: int, gbp: int, jpy: int) -> dict[str, int]:
    return {"EUR": eur, "USD": usd, "GBP": gbp, "JPY": jpy}


CATALOG: tuple[Product, ...] = (
    Product("KB-MECH-TKL", "Mechanical keyboard, tenkeyless", _prices(12900, 13999, 10999, 19800)),
    Product("MS-WL-ERGO", "Wireless ergonomic mouse", _prices(6990, 7499, 5999, 9980)),
    Product("HUB-USBC-7P", "USB-C hub, 7 ports", _prices(4990, 5499, 4299, 6980), 2),
    Product("MON-27-4K", "27-inch 4K monitor", _prices(42900, 44999, 36999, 59800)),
    Product("CBL-USBC-2M", "USB-C cable, 2 m", _prices(1490, 1599, 1299, 1980), 4),
    Product("HDST-ANC-BT", "Noise-cancelling headset", _prices(24900, 27999, 21999, 34800)),
    Product("STND-LAP-AL", "Aluminium laptop stand", _prices(3990, 4299, 3499, 5480)),
    Product("MUG-CER-350", "Ceramic mug, 350 ml", _prices(1290, 1400, 1100, 1650), 4),
    Product("NB-A5-DOT", "A5 dotted notebook", _prices(990, 1099, 850, 1320), 5),
    Product("BAG-BKPK-20L", "Laptop backpack, 20 l", _prices(8990, 9900, 7800, 12800)),
    Product("SSD-NVME-1TB", "NVMe SSD, 1 TB", _prices(8990, 9499, 7799, 13800), 2),
    Product("LAMP-DESK-LED", "LED desk lamp", _prices(5990, 6499, 5199, 7980)),
)

# Interleaved by currency so that the first few orders already use every currency.
CUSTOMERS: tuple[Customer, ...] = (
    Customer("cus-1001-lena-hoffmann", "EUR", "Marktstrasse 12, 10115 Berlin, DE"),
    Customer("cus-1002-james-carter", "USD", "350 5th Ave, New York, NY 10118, US"),
    Customer("cus-1003-olivia-bennett", "GBP", "221B Baker Street, London NW1 6XE, GB"),
    Customer("cus-1004-haruto-sato", "JPY", "1-1 Marunouchi, Chiyoda-ku, Tokyo 100-0005, JP"),
    Customer("cus-1005-camille-moreau", "EUR", "14 Rue de Rivoli, 75004 Paris, FR"),
    Customer("cus-1006-maria-garcia", "USD", "1 Market St, San Francisco, CA 94105, US"),
    Customer("cus-1007-callum-fraser", "GBP", "10 Princes Street, Edinburgh EH2 2AN, GB"),
    Customer("cus-1008-yui-tanaka", "JPY", "2-4-1 Umeda, Kita-ku, Osaka 530-0001, JP"),
    Customer("cus-1009-luca-bianchi", "EUR", "Via Roma 22, 20121 Milano, IT"),
    Customer("cus-1010-noah-kim", "USD", "400 Broad St, Seattle, WA 98109, US"),
)

CARRIERS: Mapping[str, tuple[str, ...]] = {
    "EUR": ("DHL", "DPD"),
    "USD": ("UPS", "FedEx", "USPS"),
    "GBP": ("Royal Mail", "DPD"),
    "JPY": ("Yamato", "Sagawa"),
}

CANCEL_REASONS = (
    "customer changed their mind",
    "duplicate order",
    "item no longer needed",
    "found a better price elsewhere",
    "delivery date too late",
)


@dataclass
class DemoResult:
    """What the demo recorded: order ids in placement order and how each one ended."""

    order_ids: list[UUID] = field(default_factory=list)
    events: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


class _DemoOrder:
    """One order being walked through its scenario, keeping its lines to price commands."""

    def __init__(
        self, ledger: OrderLedger, rng: random.Random, result: DemoResult, customer: Customer
    ) -> None:
        self.ledger = ledger
        self.rng = rng
        self.result = result
        self.customer = customer
        self.currency = customer.currency
        self.lines: dict[str, OrderLine] = {}
        self.captured = 0
        self.id = self._place()

    @property
    def total(self) -> int:
        return sum(line.amount for line in self.lines.values())

    def _place(self) -> UUID:
        products = self.rng.sample(CATALOG, k=self.rng.choice((1, 1, 2, 2, 3, 4)))
        lines = [self._line(product) for product in products]
        reference = f"web-{self.rng.randrange(10**8):08d}" if self.rng.random() < 0.7 else None
        placed = self.ledger.place_order(
            customer_id=self.customer.customer_id,
            currency=self.currency,
            lines=[line.as_dict() for line in lines],
            shipping_address=self.customer.shipping_address,
            client_reference=reference,
        )
        self.lines = {line.sku: line for line in lines}
        self.result.order_ids.append(placed.order_id)
        self.result.events += 1
        return placed.order_id

    def add_line(self) -> None:
        product = self.rng.choice([p for p in CATALOG if p.sku not in self.lines])
        line = self._line(product)
        self.ledger.add_line(
            self.id, sku=line.sku, quantity=line.quantity, unit_price=line.unit_price
        )
        self.lines[line.sku] = line
        self.result.events += 1

    def maybe_add_line(self) -> None:
        """Now and then a customer adds something before paying."""
        if self.rng.random() < 0.15:
            self.add_line()

    def remove_line(self) -> None:
        sku = self.rng.choice(sorted(self.lines))
        self.ledger.remove_line(self.id, sku=sku)
        del self.lines[sku]
        self.result.events += 1

    def capture(self, amount: int) -> None:
        reference = f"pay_{self.rng.getrandbits(64):016x}"
        self.ledger.capture_payment(self.id, amount=amount, payment_reference=reference)
        self.captured += amount
        self.result.events += 1

    def capture_part(self) -> None:
        self.capture(max(1, self.total * self.rng.randint(20, 80) // 100))

    def pay_in_full(self) -> None:
        """Capture the whole total, sometimes as a deposit followed by the rest."""
        if self.captured == 0 and self.rng.random() < 0.25:
            self.capture_part()
        self.capture(self.total - self.captured)

    def ship(self) -> None:
        carrier = self.rng.choice(CARRIERS[self.currency])
        self.ledger.ship_order(self.id, carrier=carrier, tracking_number=self._tracking(carrier))
        self.result.events += 1

    def deliver(self) -> None:
        self.ledger.deliver_order(self.id)
        self.result.events += 1

    def cancel(self) -> None:
        self.ledger.cancel_order(self.id, reason=self.rng.choice(CANCEL_REASONS))
        self.result.events += 1

    def refund(self, amount: int, reason: str) -> None:
        self.ledger.issue_refund(self.id, amount=amount, reason=reason)
        self.result.events += 1

    def refund_everything(self) -> None:
        """Refund a cancelled order, sometimes in two instalments."""
        if self.rng.random() < 0.3:
            first = self.captured // 2
            self.refund(first, "refund for cancelled order, part 1")
            self.refund(self.captured - first, "refund for cancelled order, part 2")
        else:
            self.refund(self.captured, "refund for cancelled order")

    def refund_returned_line(self) -> None:
        line = self.lines[self.rng.choice(sorted(self.lines))]
        self.refund(line.amount, f"customer returned {line.quantity} x {line.sku}")

    def _line(self, product: Product) -> OrderLine:
        return OrderLine(
            sku=product.sku,
            quantity=self.rng.randint(1, product.max_quantity),
            unit_price=product.prices[self.currency],
        )

    def _tracking(self, carrier: str) -> str:
        digits = "".join(str(self.rng.randrange(10)) for _ in range(18))
        if carrier == "UPS":
            return f"1Z{digits[:16]}"
        if carrier == "Royal Mail":
            return f"RM{digits[:9]}GB"
        return digits[:12]


Step = Callable[[_DemoOrder], None]


@dataclass(frozen=True)
class Scenario:
    """A path through the lifecycle after placing the order; weight is how common it is."""

    name: str
    weight: int
    steps: tuple[Step, ...]


_PAID: tuple[Step, ...] = (_DemoOrder.maybe_add_line, _DemoOrder.pay_in_full)
_DELIVERED: tuple[Step, ...] = (*_PAID, _DemoOrder.ship, _DemoOrder.deliver)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("pending_payment", 10, (_DemoOrder.maybe_add_line,)),
    Scenario("edited_before_payment", 5, (_DemoOrder.add_line, _DemoOrder.remove_line)),
    Scenario("partially_paid", 8, (_DemoOrder.maybe_add_line, _DemoOrder.capture_part)),
    Scenario("paid", 12, _PAID),
    Scenario("shipped", 14, (*_PAID, _DemoOrder.ship)),
    Scenario("delivered", 24, _DELIVERED),
    Scenario("delivered_then_returned", 5, (*_DELIVERED, _DemoOrder.refund_returned_line)),
    Scenario("cancelled_unpaid", 8, (_DemoOrder.cancel,)),
    Scenario("cancelled_refund_due", 5, (_DemoOrder.capture_part, _DemoOrder.cancel)),
    Scenario(
        "cancelled_refunded",
        9,
        (_DemoOrder.pay_in_full, _DemoOrder.cancel, _DemoOrder.refund_everything),
    ),
)


def populate(
    ledger: OrderLedger,
    *,
    orders: int,
    seed: int | None = None,
    on_order: Callable[[str], None] | None = None,
) -> DemoResult:
    """Record `orders` demo orders; the same seed records the same orders, amounts and events.

    The first orders take every scenario once, so even a small demo shows the whole lifecycle.
    """
    rng = random.Random(seed)
    first = list(SCENARIOS)
    rng.shuffle(first)
    weights = [scenario.weight for scenario in SCENARIOS]
    result = DemoResult()
    for index in range(orders):
        if index < len(first):
            scenario = first[index]
            customer = CUSTOMERS[index % len(CUSTOMERS)]
        else:
            scenario = rng.choices(SCENARIOS, weights=weights)[0]
            customer = rng.choice(CUSTOMERS)
        order = _DemoOrder(ledger, rng, result, customer)
        for step in scenario.steps:
            step(order)
        result.outcomes[scenario.name] += 1
        if on_order is not None:
            on_order(scenario.name)
    return result
