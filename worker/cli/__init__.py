"""`walletq`: the command line. Tables for people; `--json` (before or after the command) for scripts.

Exit codes: 0 ok, 1 a refusal or a failed check, 2 bad usage or input.
"""

from __future__ import annotations

from worker.cli import holds as _holds  # noqa: F401  (holds, expire-holds)
from worker.cli import ledger as _ledger  # noqa: F401  (registers the commands)
from worker.cli import lifecycle as _lifecycle  # noqa: F401  (statement)
from worker.cli import payout as _payout  # noqa: F401  (payout, payout-status)
from worker.cli import pipeline as _pipeline  # noqa: F401
from worker.cli import producer as _producer  # noqa: F401  (producer create|add|list|revoke|rotate)
from worker.cli.base import cli, main

__all__ = ["cli", "main"]
