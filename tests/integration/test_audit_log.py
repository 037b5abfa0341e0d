"""The `walletq.audit` log line: one JSON object per audit row, written with the row, saying
the same as the row."""

from __future__ import annotations

import json
import logging

import pytest

from services.atomic_transaction_manager import InsufficientBalanceError
from services.wallet_service import WalletService
from tests.support.ledger import audit


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "walletq.audit"]


def test_every_audit_row_is_also_one_json_line_on_the_walletq_audit_logger(
        service: WalletService, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "walletq.audit"):
        service.credit_wallet("alice", "10.00", idempotency_key="dep-1")
        with pytest.raises(InsufficientBalanceError):
            service.debit_wallet("alice", "99.00", idempotency_key="wd-1")
    lines = audit_lines(caplog)
    assert [(line["idempotency_key"], line["outcome"], line["error_code"]) for line in lines] == [
        ("dep-1", "succeeded", None), ("wd-1", "rejected", "insufficient_balance")]
    assert all(line["event"] == "financial_operation" for line in lines)
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "walletq.audit")
    for line in lines:
        [row] = audit(service.engine, line["idempotency_key"])
        assert {k: line[k] for k in ("command_id", "command_type", "outcome", "error_code",
                                     "accounts", "amounts", "detail")} == row
    assert lines[0]["amounts"] == [{"debit": "system:external", "credit": "user:alice:available",
                                    "amount_minor": 1000, "kind": "credit"}]


def test_a_duplicate_writes_no_second_audit_line(service: WalletService,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    service.credit_wallet("bob", "1.00", idempotency_key="dep-2")
    with caplog.at_level(logging.INFO, "walletq.audit"):
        service.credit_wallet("bob", "1.00", idempotency_key="dep-2")
    assert audit_lines(caplog) == []
