"""The exception hierarchy: one root, business refusals under one base, every code in one place.

A `BusinessRuleError` is a refusal of a well-formed command: recorded `rejected`, never
retried. Anything else under `FinancialIntegrityError` is a bug or an outage, reported
loudly. The codes are the error codes of docs/ARCHITECTURE.md ("Error codes").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "FinancialIntegrityError",
    "BusinessRuleError",
    "InvalidCommandError",
    "InsufficientBalanceError",
    "NegativeBalanceError",
    "UnknownUserError",
    "UnknownHoldError",
    "HoldNotOpenError",
    "HoldExistsError",
    "ForbiddenError",
    "UnauthenticatedError",
    "ProducerError",
    "IdempotencyConflictError",
    "TransactionIntegrityError",
    "ConcurrentOperationError",
    "PoisonMessageError",
    "EscrowIntegrityError",
    "LimitExceededError",
    "AccountFrozenError",
    "AccountClosedError",
    "AccountNotEmptyError",
    "AlreadyReversedError",
    "NotReversibleError",
    "error_class",
    "HoldExpiredError",
    "HoldNotExpiredError",
    "HoldExceededError",
]


class FinancialIntegrityError(Exception):
    """Root of every walletq error; carries an error code and the ids involved."""

    code = "internal"
    #: A business refusal is recorded as `rejected` and never retried.
    business = False

    def __init__(self, message: str, **ids: Any) -> None:
        super().__init__(message)
        self.message = message
        self.ids = {k: v for k, v in ids.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class BusinessRuleError(FinancialIntegrityError):
    """Raised when a rule of the ledger refuses a well-formed command; nothing moves."""

    business = True


class InvalidCommandError(BusinessRuleError):
    """Raised when a command is malformed: bad JSON, a wrong type, an unknown field."""

    code = "invalid_command"

    def __init__(self, message: str, errors: Sequence[dict[str, Any]] = (), **ids: Any) -> None:
        super().__init__(message, **ids)
        self.errors = list(errors)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.errors:
            out["fields"] = self.errors
        return out


class InsufficientBalanceError(BusinessRuleError):
    """Raised when a debit would take an account that may not go negative below zero."""

    code = "insufficient_balance"


class UnknownUserError(BusinessRuleError):
    """Raised when a debit names a user who has no wallet."""

    code = "unknown_user"


class UnknownHoldError(BusinessRuleError):
    """Raised when a release or refund names a hold that does not exist."""

    code = "unknown_hold"


class HoldNotOpenError(BusinessRuleError):
    """Raised when a hold was already released or refunded."""

    code = "hold_not_open"


class HoldExistsError(BusinessRuleError):
    """Raised when a new hold reuses the id of an existing one."""

    code = "hold_exists"


class ForbiddenError(BusinessRuleError):
    """Raised when an authenticated producer's role does not allow what it asks: the type,
    a fee override, or the account a payout is funded from."""

    code = "forbidden"


class UnauthenticatedError(BusinessRuleError):
    """Raised when a command's signature is missing or does not verify, or names an unknown,
    revoked or expired key or producer: nothing moves and no idempotency key is taken."""

    code = "unauthenticated"


class ProducerError(FinancialIntegrityError):
    """Raised when a producer cannot be created, found, rotated or revoked as asked."""

    code = "invalid_producer"


class IdempotencyConflictError(BusinessRuleError):
    """Raised when a key is reused with another payload; the first command is untouched."""

    code = "idempotency_conflict"


class NegativeBalanceError(FinancialIntegrityError):
    """Raised when the database itself refused a negative balance: a bug got past the check."""

    code = "internal"


class TransactionIntegrityError(FinancialIntegrityError):
    """Raised when legs do not balance or the database refuses a write it should accept."""

    code = "internal"


class EscrowIntegrityError(FinancialIntegrityError):
    """Raised when escrow balances and open holds disagree."""

    code = "internal"


class ConcurrentOperationError(FinancialIntegrityError):
    """Raised when transient database errors outlasted every retry."""

    code = "concurrent_operation"


class HoldExpiredError(BusinessRuleError):
    """Raised when a release names a hold past its expiry (expired, or about to be)."""

    code = "hold_expired"


class HoldNotExpiredError(BusinessRuleError):
    """Raised when `expire_hold` names a hold without an expiry, or before it."""

    code = "hold_not_expired"


class HoldExceededError(BusinessRuleError):
    """Raised when a release asks for more than remains held; nothing moves."""

    code = "hold_exceeded"


class LimitExceededError(BusinessRuleError):
    """Raised when a debit would take an account below its overdraft limit (or a new limit
    would leave the balance below it)."""

    code = "limit_exceeded"


class AccountFrozenError(BusinessRuleError):
    """Raised when a frozen account is debited (or credited, when frozen for both)."""

    code = "account_frozen"


class AccountClosedError(BusinessRuleError):
    """Raised when anything moves to or from a closed account, or it is changed."""

    code = "account_closed"


class AccountNotEmptyError(BusinessRuleError):
    """Raised when an account to close holds money or has an open hold."""

    code = "account_not_empty"


class AlreadyReversedError(BusinessRuleError):
    """Raised when a command was reversed already."""

    code = "already_reversed"


class NotReversibleError(BusinessRuleError):
    """Raised when the command named is unknown, did not succeed, or is of a type that is
    not reversed (a reversal, a hold, a refund, a payout, an account change)."""

    code = "not_reversible"


class PoisonMessageError(FinancialIntegrityError):
    """Raised when a command was delivered more than WALLETQ_DELIVERY_MAX times without an
    outcome (each delivery killed its worker, or failed): it is quarantined."""

    code = "poison"


# A stored outcome's code → the class a caller catches (internal codes share the root).
_BY_CODE: dict[str, type[FinancialIntegrityError]] = {
    cls.code: cls
    for cls in (InvalidCommandError, InsufficientBalanceError, UnknownUserError, UnknownHoldError,
                HoldNotOpenError, HoldExistsError, ForbiddenError, UnauthenticatedError,
                IdempotencyConflictError, ConcurrentOperationError, ProducerError,
                HoldExpiredError, HoldNotExpiredError, HoldExceededError,
                LimitExceededError, AccountFrozenError, AccountClosedError,
                AccountNotEmptyError, AlreadyReversedError, NotReversibleError,
                PoisonMessageError)
}


def error_class(code: str) -> type[FinancialIntegrityError]:
    """The typed error for a stored error code; the root for `internal` and unknown codes."""
    return _BY_CODE.get(code, FinancialIntegrityError)
