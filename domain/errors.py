"""Named domain errors: every rejected command raises one of these and records nothing."""

from __future__ import annotations


class OrderLedgerError(Exception):
    """Base class of every error the ledger raises on purpose."""


class InvalidCommandError(OrderLedgerError):
    """The command's input is malformed or out of bounds (nothing about the order's state)."""


class InvalidCurrencyError(InvalidCommandError):
    """The currency is not an ISO 4217 code."""


class InvalidAmountError(InvalidCommandError):
    """An amount, price or quantity is out of range."""


class OrderRuleError(OrderLedgerError):
    """The command is well-formed but the order's current state forbids it."""


class DuplicateLineError(OrderRuleError):
    """The order already has a line for that SKU."""


class LineNotFoundError(OrderRuleError):
    """The order has no line for that SKU."""


class LastLineRemovalError(OrderRuleError):
    """Removing the line would leave the order with no lines."""


class LinesLockedError(OrderRuleError):
    """Lines can only change before any payment is captured, before shipment and cancellation."""


class OrderCancelledError(OrderRuleError):
    """The order is cancelled."""


class PaymentExceedsTotalError(OrderRuleError):
    """The capture would take the total captured above the order total."""


class DuplicatePaymentReferenceError(OrderRuleError):
    """A payment with that reference was already captured on this order."""


class OrderNotFullyPaidError(OrderRuleError):
    """The order cannot ship until the full total is captured."""


class OrderAlreadyShippedError(OrderRuleError):
    """The order has already shipped."""


class OrderNotShippedError(OrderRuleError):
    """The order cannot be delivered before it ships."""


class OrderAlreadyDeliveredError(OrderRuleError):
    """The order has already been delivered."""


class RefundExceedsCapturedError(OrderRuleError):
    """The refund is more than captured minus already refunded."""


class OrderNotFoundError(OrderLedgerError):
    """No order has that id (or it did not exist yet at the requested point)."""


class ConcurrencyConflictError(OrderLedgerError):
    """The order moved on since the version the command expected; nothing was recorded."""

    def __init__(self, message: str, *, current_version: int | None = None) -> None:
        super().__init__(message)
        self.current_version = current_version


class IdempotencyKeyReusedError(OrderLedgerError):
    """The idempotency key was already used for a different command."""


class CommandOutcomeUnknownError(OrderLedgerError):
    """The store failed mid-command and could not then say whether the command was recorded."""
