"""`walletq payout FILE.csv --sync` and `walletq payout-status` on real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal

import pytest
from sqlalchemy import text

from services import settings as settings_module
from tests.support.cli import walletq

HEADER = "user,amount,reference\n"


def write(tmp_path, body, name="pay.csv"):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def count(engine, sql):
    with engine.connect() as conn:
        return conn.execute(text(sql)).scalar_one()


@pytest.fixture
def funded(service):
    service.admin_create_tokens("100.00")
    return service


def test_a_file_is_paid_and_the_report_names_paid_rejected_and_totals(funded, engine, tmp_path):
    path = write(tmp_path, HEADER + "bob,12.00,inv-1\ncat,50.00,inv-2\ndan,60.00,inv-3\n"
                                    "bob,1.50,inv-4\n")
    result = walletq("--json", "payout", path, "--sync")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["paid"], report["rejected"], report["duplicate"]) == (3, 1, 0)
    assert report["amount_paid"] == "63.50"
    assert report["rejected_by_code"] == {"insufficient_balance": 1}
    assert [(r["line"], r["reference"]) for r in report["rejected_items"]] == [(4, "inv-3")]
    assert funded.balance("bob").available == Decimal("13.50")
    human = walletq("payout", path, "--sync")
    assert "paid 3 items, total 63.50; rejected 1 (insufficient_balance 1)" in " ".join(
        human.stdout.split())


def test_running_the_same_file_again_pays_nothing_twice(funded, engine, tmp_path):
    path = write(tmp_path, HEADER + "bob,1.00,r-1\ncat,2.00,r-2\n")
    first = json.loads(walletq("--json", "payout", path, "--sync").stdout)
    again = json.loads(walletq("--json", "payout", path, "--sync").stdout)
    assert first["batches"][0]["idempotency_key"] == again["batches"][0]["idempotency_key"]
    assert again["paid"] == 2  # the same command's stored outcome, not a second payment
    other_key = json.loads(walletq("--json", "payout", path, "--sync", "--key", "rerun-1").stdout)
    assert (other_key["paid"], other_key["duplicate"]) == (0, 2)
    assert count(engine, "SELECT COUNT(*) FROM transfers WHERE kind = 'payout'") == 2
    assert funded.balance("cat").available == Decimal("2.00")
    assert walletq("verify").exit_code == 0


def test_a_file_over_the_item_limit_is_split_into_batches_with_derived_keys(
        funded, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("WALLETQ_PAYOUT_ITEMS_MAX", "3")
    settings_module.reset_settings()
    rows = "".join(f"u-{n},1.00,split-{n}\n" for n in range(7))
    path = write(tmp_path, HEADER + rows)
    result = walletq("--json", "payout", path, "--sync", "--key", "split")
    report = json.loads(result.stdout)
    assert [b["idempotency_key"] for b in report["batches"]] == ["split.1", "split.2", "split.3"]
    assert [b["items"] for b in report["batches"]] == [3, 3, 1]
    assert report["paid"] == 7
    status = walletq("--json", "payout-status", "split")
    assert [json.loads(line)["paid"] for line in status.stdout.splitlines()] == [3, 3, 1]
    items = walletq("payout-status", "split", "--csv")
    parsed = list(csv.DictReader(io.StringIO(items.stdout)))
    assert len(parsed) == 7 and {r["outcome"] for r in parsed} == {"paid"}
    assert parsed[6] == {"batch": "split.3", "index": "0", "user": "u-6", "amount": "1.00",
                         "reference": "split-6", "outcome": "paid", "error": ""}


def test_payout_status_shows_progress_totals_and_items(funded, tmp_path):
    path = write(tmp_path, HEADER + "bob,1.00,s-1\nbob,200.00,s-2\n")
    walletq("payout", path, "--sync", "--key", "st-1")
    human = walletq("payout-status", "st-1", "--items")
    assert human.exit_code == 0
    assert "2 of 2 items decided: paid 1 (total 1.00), rejected 1" in " ".join(human.stdout.split())
    assert "insufficient_balance" in human.stdout
    data = json.loads(walletq("--json", "payout-status", "st-1", "--items").stdout)
    assert data["status"] == "succeeded" and data["chunks_done"] == 1
    assert [i["outcome"] for i in data["items"]] == ["paid", "rejected"]
    missing = walletq("--json", "payout-status", "nope")
    assert missing.exit_code == 1


def test_an_atomic_file_the_treasury_cannot_cover_is_refused_whole(funded, engine, tmp_path):
    path = write(tmp_path, HEADER + "bob,60.00,a-1\ncat,60.00,a-2\n")
    result = walletq("--json", "payout", path, "--sync", "--atomic")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["batches"][0]["error"]["code"] == "insufficient_balance"
    assert count(engine, "SELECT COUNT(*) FROM transfers WHERE kind = 'payout'") == 0


def test_a_forbidden_funding_account_is_refused(funded, tmp_path):
    path = write(tmp_path, HEADER + "bob,1.00,f-1\n")
    result = walletq("--json", "payout", path, "--sync", "--from", "system:issuance")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["batches"][0]["error"]["code"] == "forbidden"


@pytest.mark.parametrize(("body", "expected"), [
    ("user,amount\nbob,1.00\n", "line 1 (header): missing column reference"),
    ("user,amount,reference,note\nbob,1.00,r-1,x\n", "unknown column 'note'"),
    (HEADER + "bob,1.00,r-1\ncat,1.005,r-2\n", "line 3: amount '1.005' has 3 decimal places"),
    (HEADER + "bob,1.00,r-1\ncat,ten,r-2\n", "line 3: amount 'ten' is not a plain decimal"),
    (HEADER + "bob,-1.00,r-1\n", "line 2: amount '-1.00' is not a plain decimal"),
    (HEADER + "bob,0.00,r-1\n", "line 2: amount '0.00' must be greater than zero"),
    (HEADER + "bob,1.00,r-1\ncat,2.00,r-2\ndan,3.00,r-1\n", "line 4: reference 'r-1' repeats line 2"),
    (HEADER + "bob,1.00\n", "line 2: 2 fields; expected 3"),
    (HEADER + "bo b,1.00,r-1\n", "line 2: user 'bo b' must be 1-200 characters"),
    ("", "empty file; expected a header line user,amount,reference"),
    ("\n\n", "empty file; expected a header line"),
    (HEADER, "empty file: a header and no rows"),
])
def test_an_invalid_file_names_the_row_and_pays_nothing(funded, engine, tmp_path, body, expected):
    path = write(tmp_path, body)
    commands_before = count(engine, "SELECT COUNT(*) FROM commands")
    result = walletq("payout", path, "--sync")
    assert result.exit_code == 2
    assert expected in result.stderr and "nothing submitted" in result.stderr
    as_json = walletq("--json", "payout", path, "--sync")
    assert as_json.exit_code == 2 and expected in json.loads(as_json.stdout)["error"]["message"]
    assert count(engine, "SELECT COUNT(*) FROM commands") == commands_before
    assert count(engine, "SELECT COUNT(*) FROM transfers WHERE kind = 'payout'") == 0


def test_every_bad_row_is_named_not_only_the_first(funded, tmp_path):
    path = write(tmp_path, HEADER + "bob,x,r-1\ncat,1.00,r-2\ndan,y,r-3\n")
    result = walletq("payout", path, "--sync")
    assert "line 2: amount" in result.stderr and "line 4: amount" in result.stderr


def test_a_missing_file_is_a_usage_error(funded, tmp_path):
    result = walletq("payout", str(tmp_path / "absent.csv"), "--sync")
    assert result.exit_code == 2 and "absent.csv" in result.stderr


def test_a_payout_that_no_worker_ends_in_time_exits_3_and_reports_its_progress(funded, engine,
                                                                                tmp_path):
    path = write(tmp_path, HEADER + "bob,1.00,t-1\ncat,2.00,t-2\n")
    result = walletq("--json", "payout", path, "--key", "late", "--timeout", "0")  # no worker
    assert result.exit_code == 3, result
    report = result.json()
    assert report["complete"] is False
    assert [(b["idempotency_key"], b["status"]) for b in report["batches"]] == [
        ("late", "accepted")]
    human = walletq("payout", path, "--key", "late", "--timeout", "0")
    assert human.exit_code == 3 and "walletq payout-status late" in " ".join(human.stdout.split())
    assert count(engine, "SELECT COUNT(*) FROM transfers WHERE kind = 'payout'") == 0
