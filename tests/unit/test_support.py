"""The suite's own helpers fail when they should: a ledger check that checks nothing, a
condition that never comes true."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from services.verify import Check
from tests.support import ledger
from tests.support.ledger import CHECKS, assert_ledger_sound, assert_report_sound
from tests.support.polling import eventually

SETTINGS: Any = SimpleNamespace(asset_scale=2)


def verify_returning(monkeypatch: pytest.MonkeyPatch, checks: list[Check]) -> None:
    monkeypatch.setattr(ledger, "verify_ledger", lambda engine, scale: checks)


def test_assert_ledger_sound_passes_when_every_invariant_is_checked_and_holds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    verify_returning(monkeypatch, [Check(name, True, "") for name in CHECKS])
    assert_ledger_sound(None, SETTINGS)  # type: ignore[arg-type]


@pytest.mark.parametrize(("checks", "reason"), [
    ([], "verify returned no checks"),
    ([Check(name, True, "") for name in CHECKS[1:]], "verify did not run"),
    ([Check(name, True, "") for name in CHECKS] + [Check(CHECKS[0], True, "")], "ran twice"),
    ([Check(name, name != CHECKS[2], "broken") for name in CHECKS], "broken"),
], ids=["no-checks", "one-missing", "one-twice", "one-fails"])
def test_assert_ledger_sound_fails_on_an_empty_partial_or_failing_verify(
        monkeypatch: pytest.MonkeyPatch, checks: list[Check], reason: str) -> None:
    verify_returning(monkeypatch, checks)
    with pytest.raises(AssertionError, match=reason):
        assert_ledger_sound(None, SETTINGS)  # type: ignore[arg-type]


def test_assert_report_sound_fails_on_a_cli_report_that_checked_nothing_or_disagrees() -> None:
    every = [{"name": name, "ok": True, "detail": ""} for name in CHECKS]
    assert_report_sound({"ok": True, "checks": every})
    for report in ({"ok": True, "checks": []}, {"ok": True, "checks": every[1:]},
                   {"ok": False, "checks": every}):
        with pytest.raises(AssertionError):
            assert_report_sound(report)


def test_eventually_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "", 7, 8])
    assert eventually(lambda: next(values), 5) == 7


def test_eventually_fails_at_its_deadline_saying_where_things_stood() -> None:
    with pytest.raises(AssertionError, match="(?s)last value 0.*the queue holds 3"):
        eventually(lambda: 0, 0.05, describe=lambda: "the queue holds 3")
