"""The seed's public face: its names, re-exported from the modules that own them.

`from services.atomic_transaction_manager import ...` keeps working for every name the
README and earlier code use. The homes (docs/ARCHITECTURE.md, "Layers"):
- the exception hierarchy: `services.errors`;
- the transaction boundary and the retry loop: `services.unit_of_work`;
- the balance check under the row lock: `services.ledger`;
- the audit row: `services.audit`.
"""

from __future__ import annotations

from services.audit import log_financial_operation
from services.errors import (
    BusinessRuleError,
    ConcurrentOperationError,
    EscrowIntegrityError,
    FinancialIntegrityError,
    ForbiddenError,
    HoldExistsError,
    HoldNotOpenError,
    IdempotencyConflictError,
    InsufficientBalanceError,
    InvalidCommandError,
    NegativeBalanceError,
    TransactionIntegrityError,
    UnknownHoldError,
    UnknownUserError,
)
from services.ledger import validate_balance_integrity
from services.unit_of_work import (
    RetryPolicy,
    RetryStats,
    atomic_financial_operation,
    current_connection,
    execute_with_retry,
    is_transient,
    retry_stats,
)

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
    "IdempotencyConflictError",
    "TransactionIntegrityError",
    "ConcurrentOperationError",
    "EscrowIntegrityError",
    "RetryPolicy",
    "RetryStats",
    "retry_stats",
    "atomic_financial_operation",
    "current_connection",
    "execute_with_retry",
    "is_transient",
    "validate_balance_integrity",
    "log_financial_operation",
]
