"""The accounts' lifecycle inside one coalesced batch (a worker's chunk of keys, one
transaction on PostgreSQL): a freeze and an unfreeze between debits of the same account,
a reversal, hot accounts credited and debited to a net zero; every leg's balance after it
is exact and verify places each leg before or after each freeze."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from services.message_policy import execute_keys_message
from services.settings import Settings
from services.wallet_service import WalletService
from tests.integration.test_coalescing import accept
from tests.support.ledger import assert_ledger_sound, balances, record, transfers


def cmd(type_: str, key: str, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "idempotency_key": key, **fields}


def test_a_batch_orders_freezes_among_the_legs_of_its_commands(
        service: WalletService, engine: Engine, settings: Settings) -> None:
    service.admin_create_tokens("1000.00")
    service.admin_sell_tokens_to_user("bob", "20.00")
    service.debit_wallet("bob", "1.00", idempotency_key="pre")
    batch = [
        cmd("debit_wallet", "b-1", user="bob", amount="1.00"),
        cmd("freeze_account", "b-2", user="bob", reason="review"),
        cmd("debit_wallet", "b-3", user="bob", amount="1.00"),
        cmd("credit_wallet", "b-4", user="bob", amount="0.50"),
        cmd("unfreeze_account", "b-5", user="bob", reason="cleared"),
        cmd("debit_wallet", "b-6", user="bob", amount="2.00"),
        cmd("reverse_command", "b-7", original_key="pre", reason="mistake"),
        # A command of the same batch has no outcome yet: reversed once the batch is in.
        cmd("reverse_command", "b-7x", original_key="b-1", reason="too soon"),
        cmd("admin_sell_tokens_to_user", "b-8", user="carol", amount="3.00"),
        cmd("user_sell_tokens_to_admin", "b-9", user="carol", amount="3.00"),
        cmd("set_account_limit", "b-10", user="bob", limit="5.00"),
        cmd("debit_wallet", "b-11", user="bob", amount="22.00"),
    ]
    accept(engine, settings, *batch)
    execute_keys_message(([c["idempotency_key"] for c in batch],), {}, engine=engine,
                         settings=settings, retries_left=True)
    statuses = {c["idempotency_key"]: record(engine, c["idempotency_key"]).status
                for c in batch}
    assert statuses == {**{key: "succeeded" for key in statuses}, "b-3": "rejected"}
    assert record(engine, "b-3").error["code"] == "account_frozen"  # type: ignore[index]
    for key in ("b-7", "b-7x"):
        assert transfers(engine, key) == [("system:external", "user:bob:available", 100,
                                           "reversal")]
    # 20.00 - 1.00 (pre) - 1.00 + 0.50 - 2.00 + 1.00 (pre reversed) - 22.00 = -4.50, then
    # + 1.00 when b-1 is reversed after the batch
    assert balances(engine)["user:bob:available"] == -350
    assert_ledger_sound(engine, settings)
