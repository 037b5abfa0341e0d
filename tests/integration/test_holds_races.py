"""Races on holds against real PostgreSQL, many threads at once, then every invariant:
a release and the expiry of one hold (exactly one wins), partial releases that together
exceed their hold, and a refund among them."""

from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy.engine import Engine

from services import expiry
from services.errors import BusinessRuleError
from services.settings import Settings
from services.signing import Signer
from services.wallet_service import WalletService
from tests.integration.test_holds_lifecycle import system  # noqa: F401 - the fixture
from tests.support.ledger import assert_ledger_sound, record
from tests.support.polling import eventually

HOLDS = 16
THREADS = 8
SEED = 20261203


def wait_until(moment: datetime) -> None:
    """Until the clock reaches `moment`: a start line for racing threads (polling would
    overshoot it by its backoff), not a delay standing in for a condition."""
    threading.Event().wait(max(0.0, (moment - datetime.now(UTC)).total_seconds()))


def attempt(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except BusinessRuleError as exc:
        return exc.code
    return "ok"


def test_a_release_and_the_expiry_of_one_hold_race_and_exactly_one_wins(
    service: WalletService, engine: Engine, settings: Settings, system: Signer  # noqa: F811
) -> None:
    service.credit_wallet("alice", "1000.00", idempotency_key="dep")
    expires = datetime.now(UTC) + timedelta(seconds=3)
    for n in range(HOLDS):
        service.transfer_to_escrow(f"o-{n}", "alice", "bob", "5.00", idempotency_key=f"h-{n}",
                                   expires_at=expires.isoformat())
    rng = random.Random(SEED)
    offsets = [timedelta(milliseconds=rng.randint(-400, 100)) for _ in range(HOLDS)]
    done = threading.Event()

    def release(n: int) -> str:
        wait_until(expires + offsets[n])
        return attempt(lambda: service.release_from_escrow(f"o-{n}", idempotency_key=f"rel-{n}"))

    def expire_until_done() -> int:
        wait_until(expires - timedelta(milliseconds=100))
        expired = 0
        while not done.is_set():
            expired += expiry.run_once(engine, settings, system, batch_max=4).expired
            if all(service.hold(f"o-{n}")["status"] != "held" for n in range(HOLDS)):
                done.set()
        return expired

    with ThreadPoolExecutor(HOLDS + 3) as pool:
        expirers = [pool.submit(expire_until_done) for _ in range(3)]
        releases = list(pool.map(release, range(HOLDS)))
        eventually(done.is_set, 60)
        expired_total = sum(f.result() for f in expirers)

    outcomes = Counter()
    for n, answer in enumerate(releases):
        status = service.hold(f"o-{n}")["status"]
        outcomes[status] += 1
        if status == "released":
            assert answer == "ok"
            expire = _status_of(engine, f"expire:o-{n}")
            assert expire in (None, "rejected hold_not_open")
        else:
            assert (status, answer) == ("expired", "hold_expired")
            assert _status_of(engine, f"expire:o-{n}") == "succeeded"
    # Passes running at once may each count one expiry (the second gets its stored outcome).
    assert outcomes["expired"] <= expired_total and sum(outcomes.values()) == HOLDS
    print(f"\nrelease vs expiry over {HOLDS} holds: {dict(outcomes)}")
    assert_ledger_sound(engine, settings)


def _status_of(engine: Engine, key: str) -> str | None:
    try:
        found = record(engine, key)
    except (AssertionError, LookupError):
        return None
    if found is None:
        return None
    code = (found.error or {}).get("code")
    return found.status if code is None else f"{found.status} {code}"


@pytest.mark.parametrize("refund", [False, True], ids=["releases only", "with a refund"])
def test_partial_releases_that_together_exceed_their_hold_take_what_remains_and_no_more(
    service: WalletService, engine: Engine, settings: Settings, refund: bool
) -> None:
    service.credit_wallet("alice", "1000.00", idempotency_key="dep")
    for n in range(HOLDS):
        service.transfer_to_escrow(f"o-{n}", "alice", "bob", "5.00", idempotency_key=f"h-{n}")
    calls = [(n, i) for n in range(HOLDS) for i in range(4)]  # 4 × 2.00 on each 5.00 hold
    random.Random(SEED).shuffle(calls)

    def run(call: tuple[int, int]) -> tuple[int, str, str]:
        n, i = call
        if refund and i == 3:
            return n, "refund", attempt(lambda: service.refund_from_escrow(
                f"o-{n}", idempotency_key=f"back-{n}"))
        return n, "release", attempt(lambda: service.release_from_escrow(
            f"o-{n}", amount="2.00", idempotency_key=f"rel-{n}-{i}"))

    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(run, calls))
    for n in range(HOLDS):
        mine = [(kind, answer) for m, kind, answer in answers if m == n]
        releases = sum(1 for kind, answer in mine if (kind, answer) == ("release", "ok"))
        refunded = any((kind, answer) == ("refund", "ok") for kind, answer in mine)
        assert releases <= 2
        assert {answer for _, answer in mine} <= {"ok", "hold_exceeded", "hold_not_open"}
        shown = service.hold(f"o-{n}")
        assert shown["released"] == Decimal(2 * releases)
        assert shown["refunded"] == (Decimal(5 - 2 * releases) if refunded else Decimal(0))
        assert shown["status"] == ("refunded" if refunded else "held")
    assert_ledger_sound(engine, settings)


def test_partial_releases_of_one_hold_coalesced_in_one_transaction_each_see_the_last(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    """A worker's batch applies them one after the other in one transaction: each reads the
    totals the previous one left (kept in the book), the flush writes the last."""
    from services.message_policy import Done, execute_message
    from tests.integration.test_coalescing import accept
    from tests.support.signing import signed

    service.credit_wallet("alice", "100.00", idempotency_key="dep")
    service.transfer_to_escrow("o-1", "alice", "bob", "10.00", idempotency_key="h-1")
    release = {"type": "release_from_escrow", "hold_id": "o-1"}
    batch = [{**release, "idempotency_key": "p-1", "amount": "3.00"},
             {**release, "idempotency_key": "p-2", "amount": "3.00"},
             {**release, "idempotency_key": "p-3", "amount": "5.00"},  # 4.00 remains: refused
             {"type": "refund_from_escrow", "idempotency_key": "back", "hold_id": "o-1"}]
    accept(engine, settings, *batch)
    outcome = execute_message((signed(batch[0]),), {}, engine=engine, settings=settings,
                              retries_left=True)
    assert isinstance(outcome, Done)
    ended = [_status_of(engine, c["idempotency_key"]) for c in batch]
    assert ended == ["succeeded", "succeeded", "rejected hold_exceeded", "succeeded"]
    shown = service.hold("o-1")
    assert (shown["status"], shown["released"], shown["refunded"], shown["fee"]) == (
        "refunded", Decimal("6.00"), Decimal("4.00"), Decimal("0.60"))
    assert_ledger_sound(engine, settings)
