"""Batch payouts: many (user, amount, reference) items paid from one funding account.

- `command`: the `payout_batch` model;
- `decision`: what happens to each item (pure, tested without a database);
- `store`: the `payout_batches` and `payout_items` tables;
- `executor`: the chunk-by-chunk run, each chunk one transaction;
- `file`: a CSV payout file read, validated whole and split into batch commands.
"""

from services.payouts.command import PayoutBatch, PayoutItem
from services.payouts.decision import FUNDING_KINDS, Decision, Item, decide
from services.payouts.executor import execute_payout_batch
from services.payouts.instruments import AFTER_CHUNK_HOOKS, TIMINGS
from services.payouts.store import (
    check_batch_transfers,
    payout_item_rows,
    payout_progress,
    payouts_done,
)

__all__ = [
    "PayoutBatch",
    "PayoutItem",
    "Item",
    "Decision",
    "decide",
    "execute_payout_batch",
    "check_batch_transfers",
    "payout_progress",
    "payouts_done",
    "payout_item_rows",
    "AFTER_CHUNK_HOOKS",
    "TIMINGS",
    "FUNDING_KINDS",
]
