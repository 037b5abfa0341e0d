"""Command dicts of every type, as a producer sends them (docs/ARCHITECTURE.md, "Interfaces").

Amounts are decimal strings; optional fields (memo, fee_rate, ...) go in `extra`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["credit", "debit", "transfer", "hold", "release", "refund", "mint", "sell",
           "buyback", "payout", "item", "items"]

Command = dict[str, Any]


def _command(type_: str, key: str, **fields: Any) -> Command:
    return {"type": type_, "idempotency_key": key,
            **{name: value for name, value in fields.items() if value is not None}}


def credit(key: str, user: str, amount: str, **extra: Any) -> Command:
    return _command("credit_wallet", key, user=user, amount=amount, **extra)


def debit(key: str, user: str, amount: str, **extra: Any) -> Command:
    return _command("debit_wallet", key, user=user, amount=amount, **extra)


def transfer(key: str, from_user: str, to_user: str, amount: str, **extra: Any) -> Command:
    return _command("transfer_tokens_between_users", key, from_user=from_user, to_user=to_user,
                    amount=amount, **extra)


def hold(key: str, hold_id: str, payer: str, payee: str, amount: str, **extra: Any) -> Command:
    return _command("transfer_to_escrow", key, hold_id=hold_id, payer=payer, payee=payee,
                    amount=amount, **extra)


def release(key: str, hold_id: str, fee_rate: str | None = None, **extra: Any) -> Command:
    return _command("release_from_escrow", key, hold_id=hold_id, fee_rate=fee_rate, **extra)


def refund(key: str, hold_id: str, **extra: Any) -> Command:
    return _command("refund_from_escrow", key, hold_id=hold_id, **extra)


def mint(key: str, amount: str, **extra: Any) -> Command:
    return _command("admin_create_tokens", key, amount=amount, **extra)


def sell(key: str, user: str, amount: str, **extra: Any) -> Command:
    return _command("admin_sell_tokens_to_user", key, user=user, amount=amount, **extra)


def buyback(key: str, user: str, amount: str, **extra: Any) -> Command:
    return _command("user_sell_tokens_to_admin", key, user=user, amount=amount, **extra)


def payout(key: str, payout_items: list[dict[str, str]], **extra: Any) -> Command:
    return _command("payout_batch", key, items=payout_items, **extra)


def item(user: str, amount: str, reference: str) -> dict[str, str]:
    return {"user": user, "amount": amount, "reference": reference}


def items(prefix: str, n: int, amount: str = "1.00", users: str | None = None,
          users_max: int = 400) -> list[dict[str, str]]:
    """n items with references prefix-0 ...; one user each, or `users`-0 ... shared round-robin."""
    return [item(f"{users}-{i % users_max}" if users else f"{prefix}-{i}", amount, f"{prefix}-{i}")
            for i in range(n)]
