"""Single-command operations, one module per family (wallet, treasury, escrow).

Each module holds, per command type, its model (what a producer sends), its handler
`(conn, command, ctx) -> Effect` (lock, check, move money through the ledger) and the
transfers a succeeded command implies (what `walletq verify` expects). Handlers run inside
the executor's transaction; the executor owns commit, rollback, idempotency and the audit
row. `services.command_types` lists them all.
"""

from services.operations.base import Effect, OperationContext, TransferFacts

__all__ = ["Effect", "OperationContext", "TransferFacts"]
