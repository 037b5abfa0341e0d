"""A model-based test of the public API: hypothesis drives WalletService through random
sequences of every command type — duplicates, conflicting replays, a release and a refund
of one hold — against a model of the ledger in plain Python. After every step the model's
balances equal walletq's and every invariant holds (services.verify).

It runs on PostgreSQL and on embedded SQLite. The `ci` hypothesis profile (tests/conftest.py)
bounds it; `pytest tests/integration/test_state_machine.py --hypothesis-profile=long
--timeout 3600` runs it far deeper (about ten minutes on PostgreSQL: past the suite's
per-test timeout of 600 s, hence the flag). Each example gets a database of its own (a
PostgreSQL clone of the migrated template, a copy of a migrated SQLite file), so that it
depends on nothing but its own steps: hypothesis can replay and shrink a failure to its
shortest sequence.
"""

from __future__ import annotations

import inspect
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from services.atomic_transaction_manager import (
    BusinessRuleError,
    IdempotencyConflictError,
    UnknownUserError,
)
from services.db import make_engine, upgrade
from services.settings import Settings, load_settings
from services.wallet_service import WalletService
from tests import servers
from tests.conftest import pg_clone
from tests.support import builders
from tests.support.ledger import assert_ledger_sound

TREASURY, FEES = "platform:treasury", "platform:fees"
ISSUANCE, EXTERNAL = "system:issuance", "system:external"
USERS = 4
RATES = (None, "0", "0.035", "0.10", "1")

TYPES_THAT_MUST_SUCCEED = (
    "credit_wallet", "debit_wallet", "transfer_tokens_between_users", "transfer_to_escrow",
    "release_from_escrow", "refund_from_escrow", "admin_create_tokens",
    "admin_sell_tokens_to_user", "user_sell_tokens_to_admin", "payout_batch")

users = st.integers(0, USERS - 1)
two_users = st.lists(users, min_size=2, max_size=2, unique=True)
amounts = st.integers(1, 3_000)  # minor units: 0.01 to 30.00
mints = st.integers(1, 50_000)


def money(minor: int) -> str:
    return f"{minor // 100}.{minor % 100:02d}"


def fee_of(amount_minor: int, rate: Decimal) -> int:
    """The model's own rounding: amount x rate, half-even to a whole minor unit."""
    return int((Decimal(amount_minor) * rate).quantize(Decimal(1), ROUND_HALF_EVEN))


@dataclass
class Hold:
    payer: str
    payee: str
    amount: int
    fee_rate: Decimal  # fixed when the hold opens; a release may name another
    open: bool = True


@dataclass(frozen=True)
class Outcome:
    status: str  # succeeded | rejected
    code: str | None = None
    result: Any = None


class Model:
    """The ledger in plain Python: balances by account code, wallets, holds, paid references."""

    def __init__(self, default_fee_rate: Decimal) -> None:
        self.fee_rate = default_fee_rate
        self.balances: Counter[str] = Counter()
        self.wallets: set[str] = set()
        self.holds: dict[str, Hold] = {}
        self.paid: dict[str, set[str]] = {}

    @staticmethod
    def available(user: str) -> str:
        return f"user:{user}:available"

    @staticmethod
    def escrow(user: str) -> str:
        return f"user:{user}:escrow"

    def move(self, debit: str, credit: str, amount: int) -> None:
        self.balances[debit] -= amount
        self.balances[credit] += amount

    def spendable(self, user: str, amount: int) -> Outcome | None:
        """The refusal a debit of `user` meets, if any."""
        if user not in self.wallets:
            return Outcome("rejected", "unknown_user")
        if self.balances[self.available(user)] < amount:
            return Outcome("rejected", "insufficient_balance")
        return None

    # --- one method per command type: the expected outcome, applied when it succeeds ----

    def credit_wallet(self, c: dict[str, Any], a: int) -> Outcome:
        self.wallets.add(c["user"])
        self.move(EXTERNAL, self.available(c["user"]), a)
        return Outcome("succeeded")

    def debit_wallet(self, c: dict[str, Any], a: int) -> Outcome:
        refusal = self.spendable(c["user"], a)
        if refusal:
            return refusal
        self.move(self.available(c["user"]), EXTERNAL, a)
        return Outcome("succeeded")

    def transfer_tokens_between_users(self, c: dict[str, Any], a: int) -> Outcome:
        refusal = self.spendable(c["from_user"], a)
        if refusal:
            return refusal
        self.wallets.add(c["to_user"])
        self.move(self.available(c["from_user"]), self.available(c["to_user"]), a)
        return Outcome("succeeded")

    def transfer_to_escrow(self, c: dict[str, Any], a: int) -> Outcome:
        if c["hold_id"] in self.holds:
            return Outcome("rejected", "hold_exists")
        refusal = self.spendable(c["payer"], a)
        if refusal:
            return refusal
        rate = Decimal(c["fee_rate"]) if "fee_rate" in c else self.fee_rate
        self.holds[c["hold_id"]] = Hold(c["payer"], c["payee"], a, rate)
        self.move(self.available(c["payer"]), self.escrow(c["payer"]), a)
        return Outcome("succeeded")

    def _open_hold(self, hold_id: str) -> Hold | Outcome:
        hold = self.holds.get(hold_id)
        if hold is None:
            return Outcome("rejected", "unknown_hold")
        if not hold.open:
            return Outcome("rejected", "hold_not_open")
        return hold

    def release_from_escrow(self, c: dict[str, Any], _: int) -> Outcome:
        hold = self._open_hold(c["hold_id"])
        if isinstance(hold, Outcome):
            return hold
        rate = Decimal(c["fee_rate"]) if "fee_rate" in c else hold.fee_rate
        fee = fee_of(hold.amount, rate)
        hold.open = False
        self.wallets.add(hold.payee)
        self.move(self.escrow(hold.payer), self.available(hold.payee), hold.amount - fee)
        self.move(self.escrow(hold.payer), FEES, fee)
        return Outcome("succeeded", result={"fee": money(fee),
                                            "payee_amount": money(hold.amount - fee)})

    def refund_from_escrow(self, c: dict[str, Any], _: int) -> Outcome:
        hold = self._open_hold(c["hold_id"])
        if isinstance(hold, Outcome):
            return hold
        hold.open = False
        self.move(self.escrow(hold.payer), self.available(hold.payer), hold.amount)
        return Outcome("succeeded")

    def admin_create_tokens(self, c: dict[str, Any], a: int) -> Outcome:
        self.move(ISSUANCE, TREASURY, a)
        return Outcome("succeeded")

    def admin_sell_tokens_to_user(self, c: dict[str, Any], a: int) -> Outcome:
        if self.balances[TREASURY] < a:
            return Outcome("rejected", "insufficient_balance")
        self.wallets.add(c["user"])
        self.move(TREASURY, self.available(c["user"]), a)
        return Outcome("succeeded")

    def user_sell_tokens_to_admin(self, c: dict[str, Any], a: int) -> Outcome:
        refusal = self.spendable(c["user"], a)
        if refusal:
            return refusal
        self.move(self.available(c["user"]), TREASURY, a)
        return Outcome("succeeded")

    def payout_batch(self, c: dict[str, Any], _: int) -> Outcome:
        funder = c["from_account"]
        funding_user = funder.split(":")[1] if funder.startswith("user:") else None
        if funding_user is not None and funding_user not in self.wallets:
            return Outcome("rejected", "unknown_user")
        balance, seen = self.balances[funder], self.paid.setdefault(funder, set())
        decided: list[tuple[dict[str, str], str]] = []
        for item in c["items"]:
            minor = int(Decimal(item["amount"]) * 100)
            if item["reference"] in seen:
                decided.append((item, "duplicate"))
            elif item["user"] == funding_user:
                decided.append((item, "forbidden"))
            elif minor > balance:
                decided.append((item, "insufficient_balance"))
            else:
                balance -= minor
                decided.append((item, "paid"))
        refused = [outcome for _, outcome in decided if outcome not in ("paid", "duplicate")]
        if c.get("atomic") and refused:
            return Outcome("rejected", refused[0])
        for item, outcome in decided:
            if outcome == "paid":
                seen.add(item["reference"])
                self.wallets.add(item["user"])
                self.move(funder, self.available(item["user"]), int(Decimal(item["amount"]) * 100))
        counts = Counter(outcome for _, outcome in decided)
        return Outcome("succeeded", result={
            "paid": counts["paid"], "duplicate": counts["duplicate"],
            "rejected": sum(n for o, n in counts.items() if o not in ("paid", "duplicate"))})


#: A new, migrated database for one example: (settings, a callable that removes it).
Databases = Callable[[], tuple[Settings, Callable[[], None]]]


class WalletMachine(RuleBasedStateMachine):
    """One example: a database of its own, an empty model."""

    databases: Databases
    #: Examples run and steps checked, for the figures the test prints (run with -s).
    runs: Counter[str]

    def __init__(self) -> None:
        super().__init__()
        self.runs["examples"] += 1
        settings, self.remove_database = self.databases()
        self.engine = make_engine(settings)
        self.service = WalletService(self.engine, settings)
        self.prefix = f"sm{uuid.uuid4().hex[:8]}"
        self.sent: list[tuple[dict[str, Any], Outcome]] = []
        self.serial = 0
        self.model = Model(settings.fee_rate)

    def teardown(self) -> None:
        self.engine.dispose()
        self.remove_database()

    # --- naming and sending -----------------------------------------------------------

    def user(self, n: int) -> str:
        return f"{self.prefix}-u{n}"

    def key(self) -> str:
        self.serial += 1
        return f"{self.prefix}:{self.serial}"

    def call(self, command: dict[str, Any]) -> Outcome:
        """Through the type's WalletService method, as a caller would; through execute where
        the method has no parameter for a field (a payout, a hold's fee rate)."""
        fields = {k: v for k, v in command.items() if k not in ("type", "idempotency_key")}
        method = getattr(self.service, command["type"], None)
        if method is None or not set(fields) <= set(inspect.signature(method).parameters):
            record = self.service.execute(command)
            return Outcome(record.status, record.error_code, record.result)
        try:
            return Outcome("succeeded", result=method(idempotency_key=command["idempotency_key"],
                                                      **fields))
        except BusinessRuleError as exc:
            return Outcome("rejected", exc.code)

    def send(self, command: dict[str, Any], amount_minor: int = 0) -> None:
        expected = getattr(self.model, command["type"])(command, amount_minor)
        got = self.call(command)
        assert (got.status, got.code) == (expected.status, expected.code), (command, got)
        for name, value in (expected.result or {}).items():
            assert got.result[name] == value, (command, name, got.result)
        self.sent.append((command, got))
        self.runs[f"{command['type']} {got.status}"] += 1

    # --- rules: every command type ------------------------------------------------------

    @initialize(amount=mints)
    def mint_some(self, amount: int) -> None:
        self.send(builders.mint(self.key(), money(amount)), amount)

    @initialize(funds=st.lists(st.integers(1_000, 50_000), min_size=USERS - 1,
                               max_size=USERS - 1))
    def fund_all_users_but_the_last(self, funds: list[int]) -> None:
        """Users with money, so that holds, releases, refunds and sales back succeed often
        enough to be checked; the last user starts without a wallet (unknown_user paths)."""
        for n, amount in enumerate(funds):
            self.send(builders.credit(self.key(), self.user(n), money(amount)), amount)

    @rule(amount=mints)
    def mint(self, amount: int) -> None:
        self.send(builders.mint(self.key(), money(amount)), amount)

    @rule(user=users, amount=amounts)
    def credit(self, user: int, amount: int) -> None:
        self.send(builders.credit(self.key(), self.user(user), money(amount)), amount)

    @rule(user=users, amount=amounts)
    def debit(self, user: int, amount: int) -> None:
        self.send(builders.debit(self.key(), self.user(user), money(amount)), amount)

    @rule(pair=two_users, amount=amounts)
    def transfer(self, pair: list[int], amount: int) -> None:
        payer, payee = (self.user(n) for n in pair)
        self.send(builders.transfer(self.key(), payer, payee, money(amount)), amount)

    @rule(user=users, amount=amounts)
    def sell(self, user: int, amount: int) -> None:
        self.send(builders.sell(self.key(), self.user(user), money(amount)), amount)

    @rule(user=users, amount=amounts)
    def buyback(self, user: int, amount: int) -> None:
        self.send(builders.buyback(self.key(), self.user(user), money(amount)), amount)

    @rule(pair=two_users, amount=amounts, rate=st.sampled_from(RATES))
    def hold(self, pair: list[int], amount: int, rate: str | None) -> None:
        payer, payee = (self.user(n) for n in pair)
        hold_id = f"{self.prefix}-h{len(self.model.holds) + self.serial}"
        self.send(builders.hold(self.key(), hold_id, payer, payee, money(amount), fee_rate=rate),
                  amount)

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data(), pair=two_users, amount=amounts)
    def hold_under_a_taken_id(self, data: st.DataObject, pair: list[int], amount: int) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.model.holds)))
        payer, payee = (self.user(n) for n in pair)
        self.send(builders.hold(self.key(), hold_id, payer, payee, money(amount)), amount)

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data(), rate=st.sampled_from(RATES))
    def release(self, data: st.DataObject, rate: str | None) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.model.holds)))
        self.send(builders.release(self.key(), hold_id, fee_rate=rate))

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.model.holds)))
        self.send(builders.refund(self.key(), hold_id))

    def richest(self) -> int:
        return max(range(USERS), key=lambda n: self.model.balances[Model.available(self.user(n))])

    @precondition(lambda self: self.model.balances[Model.available(self.user(self.richest()))])
    @rule(payee=users, amount=amounts, release=st.booleans(), rate=st.sampled_from(RATES))
    def hold_then_close(self, payee: int, amount: int, release: bool, rate: str | None) -> None:
        """A hold its payer can cover, released or refunded at once: closings that succeed
        (random holds are often refused, or closed before a release or refund draws them)."""
        payer = self.richest()
        amount = min(amount, self.model.balances[Model.available(self.user(payer))])
        hold_id = f"{self.prefix}-hc{self.serial}"
        self.send(builders.hold(self.key(), hold_id, self.user(payer),
                                self.user(payee if payee != payer else (payer + 1) % USERS),
                                money(amount), fee_rate=rate), amount)
        self.send(builders.release(self.key(), hold_id) if release
                  else builders.refund(self.key(), hold_id))

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data(), release_first=st.booleans(), rate=st.sampled_from(RATES))
    def release_and_refund_one_hold(self, data: st.DataObject, release_first: bool,
                                    rate: str | None) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.model.holds)))
        pair = [builders.release(self.key(), hold_id, fee_rate=rate),
                builders.refund(self.key(), hold_id)]
        for command in pair if release_first else pair[::-1]:
            self.send(command)

    @rule(data=st.data(), funder=st.sampled_from(["treasury", "fees", "user"]),
          atomic=st.booleans())
    def payout(self, data: st.DataObject, funder: str, atomic: bool) -> None:
        rows = data.draw(st.lists(st.tuples(users, amounts, st.integers(0, 7)), min_size=1,
                                  max_size=5, unique_by=lambda row: row[2]))
        from_account = {"treasury": TREASURY, "fees": FEES}.get(funder) or (
            self.model.available(self.user(data.draw(users))))
        items = [builders.item(self.user(u), money(a), f"{self.prefix}-r{r}") for u, a, r in rows]
        self.send(builders.payout(self.key(), items, from_account=from_account,
                                  atomic=atomic or None))

    # --- replays ------------------------------------------------------------------------

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        """Same key, same payload: the stored outcome, no second effect."""
        command, first = data.draw(st.sampled_from(self.sent))
        record = self.service.execute(dict(command))
        assert (record.status, record.error_code) == (first.status, first.code), command
        if first.status == "succeeded":
            assert record.result == first.result, command

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def conflicting_replay(self, data: st.DataObject) -> None:
        """Same key, another payload: idempotency_conflict, and nothing moves."""
        command, _ = data.draw(st.sampled_from(self.sent))
        try:
            self.service.execute({**command, "memo": f"another payload {self.serial}"})
        except IdempotencyConflictError as exc:
            assert exc.code == "idempotency_conflict"
        else:
            raise AssertionError(f"a conflicting replay of {command} was accepted")

    # --- after every step ---------------------------------------------------------------

    @invariant()
    def balances_match_the_model(self) -> None:
        """Every account WalletService.balances lists holds what the model says, and the model
        knows of no balance walletq lacks; a user has a wallet exactly when the model opened
        one."""
        found = {row["account"]: int(row["balance"] * 100) for row in self.service.balances()}
        codes = set(found) | {code for code, minor in self.model.balances.items() if minor}
        assert {code: found.get(code, 0) for code in codes} == {
            code: self.model.balances[code] for code in codes}
        wallets = {code.split(":")[1] for code in found if code.endswith(":available")}
        assert wallets == self.model.wallets

    @precondition(lambda self: self.model.wallets)
    @rule(data=st.data())
    def read_a_balance(self, data: st.DataObject) -> None:
        """WalletService.balance agrees with the model, and knows no user the model does not."""
        n = data.draw(users)
        user = self.user(n)
        if user not in self.model.wallets:
            with pytest.raises(UnknownUserError):
                self.service.balance(user)
            return
        balance = self.service.balance(user)
        assert (int(balance.available * 100), int(balance.escrow * 100)) == (
            self.model.balances[Model.available(user)], self.model.balances[Model.escrow(user)])

    @invariant()
    def every_invariant_holds(self) -> None:
        self.runs["checks"] += 1
        assert_ledger_sound(self.service.engine, self.service.settings)


@pytest.fixture
def pg_databases(pg_admin: Engine, pg_template: str, walletq_env: dict[str, str]) -> Databases:
    def new() -> tuple[Settings, Callable[[], None]]:
        name = pg_clone(pg_admin, pg_template)
        url = make_url(servers.PG_URL).set(database=name).render_as_string(hide_password=False)

        def remove() -> None:
            with pg_admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

        return load_settings({**walletq_env, "WALLETQ_DATABASE_URL": url}), remove

    return new


@pytest.fixture
def sqlite_databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    template = tmp_path_factory.mktemp("sqlite-template")
    upgrade(load_settings({"WALLETQ_HOME": str(template)}))

    def new() -> tuple[Settings, Callable[[], None]]:
        home = tmp_path_factory.mktemp("example")
        shutil.copy(template / "walletq.db", home / "walletq.db")
        return load_settings({"WALLETQ_HOME": str(home)}), lambda: shutil.rmtree(home)

    yield new


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_walletq_behaves_like_its_model_under_any_sequence_of_commands(
        request: pytest.FixtureRequest, database: str) -> None:
    databases: Databases = request.getfixturevalue(
        "pg_databases" if database == "postgresql" else "sqlite_databases")
    runs: Counter[str] = Counter()
    machine = type("Machine", (WalletMachine,), {"databases": staticmethod(databases),
                                                 "runs": runs})
    started = time.perf_counter()
    run_state_machine_as_test(machine, settings=hypothesis_settings())
    profile = hypothesis_settings()
    # The run checked what it claims only if every type succeeded at least once (a model
    # whose users never have money checks refusals only).
    never = [name for name in TYPES_THAT_MUST_SUCCEED if not runs[f"{name} succeeded"]]
    assert not never, f"no successful {never} in {runs}"
    print(f"\n[state machine, {database}] {runs['examples']} examples, {runs['checks']} states"
          f" checked (steps + the initial one of each example), at most"
          f" {profile.stateful_step_count} steps an example, in"
          f" {time.perf_counter() - started:.1f} s; succeeded: "
          + ", ".join(f"{name} {runs[name + ' succeeded']}" for name in TYPES_THAT_MUST_SUCCEED))
