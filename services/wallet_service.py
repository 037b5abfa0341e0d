"""WalletService: the nine operations and the reads, for a web request, a script or a test.

Every method is a command: it runs through the same idempotent executor the worker calls,
so a direct call leaves the same transfers, command record and audit row. Pass an
idempotency key to make a retry of the call safe; without one, a fresh key is made. A
command without a signature is signed as this process's producer
(services.producer_identity); one that carries its producer and signature is taken as is.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Engine

from services import command_store, schema
from services.admission import SignedHere, as_object, sign_if_unsigned
from services.command_executor import execute_command
from services.command_fields import CommandBase
from services.command_status import CommandStatus
from services.command_store import CommandRecord, iso
from services.db import get_engine
from services.errors import InvalidCommandError, UnknownHoldError, UnknownUserError, error_class
from services.hold_rules import as_utc
from services.ledger import user_available, user_escrow
from services.money import to_decimal
from services.producer_identity import signer_for
from services.settings import Settings, get_settings
from services.signing import Signer, public_key_text

__all__ = ["WalletService", "Balance", "raise_for_outcome"]


def raise_for_outcome(record: CommandRecord) -> dict[str, Any]:
    """The result of a succeeded command, or its refusal raised as the typed error."""
    if record.status == CommandStatus.SUCCEEDED:
        return dict(record.result or {})
    error = record.error or {"code": "internal", "message": f"command is {record.status}"}
    raise error_class(error["code"])(error["message"], idempotency_key=record.idempotency_key)


@dataclass(frozen=True)
class Balance:
    user: str
    available: Decimal
    escrow: Decimal

    def to_dict(self) -> dict[str, str]:
        return {"user": self.user, "available": format(self.available, "f"),
                "escrow": format(self.escrow, "f")}


class WalletService:
    """An edge: with no arguments, its settings and engine come from the WALLETQ_* environment."""

    def __init__(self, engine: Engine | None = None, settings: Settings | None = None,
                 signer: Signer | None = None) -> None:
        self.settings = settings or get_settings()
        self.engine = engine or get_engine(self.settings)
        self._signer = signer
        self._signer_public: tuple[Signer, str] | None = None

    @property
    def signer(self) -> Signer | None:
        """This process's producer, found (or, embedded, made) on first use."""
        if self._signer is None:
            self._signer = signer_for(self.settings, self.engine)
        return self._signer

    # --- the entry point ------------------------------------------------------------

    def execute(self, command: Any) -> CommandRecord:
        """Apply a command (model, dict or JSON) once, signed as this process's producer
        unless it carries a signature; returns its stored outcome. A command signed here is
        not verified again (its key must still be the producer's, valid, and allowed)."""
        here = None
        if not isinstance(command, CommandBase) and "signature" not in as_object(command):
            signer = self.signer
            command, signed = sign_if_unsigned(command, signer)
            if signer is not None:
                here = SignedHere(signed, self._public_text(signer))
        return execute_command(command, engine=self.engine, settings=self.settings,
                               signed_here=here)

    def _public_text(self, signer: Signer) -> str:
        if self._signer_public is None or self._signer_public[0] is not signer:
            self._signer_public = (signer, public_key_text(signer.private_key.public_key()))
        return self._signer_public[1]

    def _run(self, type_: str, key: str | None, **fields: Any) -> dict[str, Any]:
        data = {"type": type_, "idempotency_key": key or f"direct:{uuid.uuid4().hex}"}
        data.update({k: _edge(v) for k, v in fields.items() if v is not None})
        return raise_for_outcome(self.execute(data))

    # --- the nine operations ----------------------------------------------------------

    def credit_wallet(self, user: str, amount: Decimal | str, *, idempotency_key: str | None = None,
                      memo: str | None = None) -> dict[str, Any]:
        return self._run("credit_wallet", idempotency_key, user=user, amount=amount, memo=memo)

    def debit_wallet(self, user: str, amount: Decimal | str, *, idempotency_key: str | None = None,
                     memo: str | None = None) -> dict[str, Any]:
        return self._run("debit_wallet", idempotency_key, user=user, amount=amount, memo=memo)

    def transfer_tokens_between_users(
        self, from_user: str, to_user: str, amount: Decimal | str, *,
        idempotency_key: str | None = None, memo: str | None = None,
    ) -> dict[str, Any]:
        return self._run("transfer_tokens_between_users", idempotency_key, from_user=from_user,
                         to_user=to_user, amount=amount, memo=memo)

    def transfer_to_escrow(
        self, hold_id: str, payer: str, payee: str, amount: Decimal | str, *,
        idempotency_key: str | None = None, memo: str | None = None,
        expires_at: str | None = None, expires_in_s: int | None = None,
    ) -> dict[str, Any]:
        return self._run("transfer_to_escrow", idempotency_key, hold_id=hold_id, payer=payer,
                         payee=payee, amount=amount, memo=memo, expires_at=expires_at,
                         expires_in_s=expires_in_s)

    def release_from_escrow(
        self, hold_id: str, *, fee_rate: Decimal | str | None = None,
        idempotency_key: str | None = None, memo: str | None = None,
        amount: Decimal | str | None = None,
    ) -> dict[str, Any]:
        """Release `amount` of the hold (None: all that remains)."""
        return self._run("release_from_escrow", idempotency_key, hold_id=hold_id,
                         fee_rate=fee_rate, memo=memo, amount=amount)

    def refund_from_escrow(self, hold_id: str, *, idempotency_key: str | None = None,
                           memo: str | None = None) -> dict[str, Any]:
        return self._run("refund_from_escrow", idempotency_key, hold_id=hold_id, memo=memo)

    def admin_create_tokens(self, amount: Decimal | str, *, idempotency_key: str | None = None,
                            memo: str | None = None) -> dict[str, Any]:
        return self._run("admin_create_tokens", idempotency_key, amount=amount, memo=memo)

    def admin_sell_tokens_to_user(
        self, user: str, amount: Decimal | str, *, idempotency_key: str | None = None,
        memo: str | None = None,
    ) -> dict[str, Any]:
        return self._run("admin_sell_tokens_to_user", idempotency_key, user=user, amount=amount,
                         memo=memo)

    def user_sell_tokens_to_admin(
        self, user: str, amount: Decimal | str, *, idempotency_key: str | None = None,
        memo: str | None = None,
    ) -> dict[str, Any]:
        return self._run("user_sell_tokens_to_admin", idempotency_key, user=user, amount=amount,
                         memo=memo)

    # --- reads ------------------------------------------------------------------------

    def balance(self, user: str) -> Balance:
        """A user's available and escrow balances; an unknown user is an error, not zero."""
        a = schema.accounts
        codes = [user_available(user).code, user_escrow(user).code]
        with self.engine.connect() as conn:
            rows = dict(conn.execute(select(a.c.code, a.c.balance_minor)
                                     .where(a.c.code.in_(codes))).all())
        if not rows:
            raise UnknownUserError(f"user {user!r} has no wallet", user=user)
        scale = self.settings.asset_scale
        return Balance(user, to_decimal(rows.get(codes[0], 0), scale),
                       to_decimal(rows.get(codes[1], 0), scale))

    def balances(self) -> list[dict[str, Any]]:
        a = schema.accounts
        with self.engine.connect() as conn:
            rows = conn.execute(select(a.c.code, a.c.balance_minor).order_by(a.c.code)).all()
        scale = self.settings.asset_scale
        return [{"account": code, "balance": to_decimal(minor, scale)} for code, minor in rows]

    def history(self, account: str, limit: int = 50) -> list[dict[str, Any]]:
        """An account's transfers, newest first, each signed from the account's side."""
        a, t = schema.accounts, schema.transfers
        debit, credit = a.alias("debit"), a.alias("credit")
        with self.engine.connect() as conn:
            account_id = conn.execute(select(a.c.id).where(a.c.code == account)).scalar()
            if account_id is None:
                raise UnknownUserError(f"no account {account!r}", account=account)
            rows = conn.execute(
                select(t.c.id, t.c.amount_minor, t.c.kind, t.c.created_at, debit.c.code,
                       credit.c.code, t.c.command_id, t.c.debit_balance_after_minor,
                       t.c.credit_balance_after_minor)
                .join(debit, debit.c.id == t.c.debit_account_id)
                .join(credit, credit.c.id == t.c.credit_account_id)
                .where(or_(t.c.debit_account_id == account_id,
                           t.c.credit_account_id == account_id))
                .order_by(t.c.id.desc())
                .limit(min(limit, 10_000))
            ).all()
            keys = command_store.keys_by_id(conn, {row.command_id for row in rows})
        scale = self.settings.asset_scale
        return [
            {"transfer_id": row.id, "at": iso(row.created_at), "kind": row.kind,
             "debit": row[4], "credit": row[5],
             "amount": to_decimal(row.amount_minor if row[5] == account else -row.amount_minor,
                                  scale),
             "idempotency_key": keys[row.command_id],
             # the account's running balance: recorded on the leg, not summed
             "balance_after": to_decimal(row[8] if row[5] == account else row[7], scale)}
            for row in rows
        ]

    def open_holds(self, user: str) -> list[dict[str, Any]]:
        h = schema.holds
        with self.engine.connect() as conn:
            rows = conn.execute(select(h).where(and_(h.c.payer == user, h.c.status == "held"))
                                .order_by(h.c.id)).all()
        scale = self.settings.asset_scale
        return [{"hold_id": r.hold_id, "payee": r.payee,
                 "amount": to_decimal(r.amount_minor, scale)} for r in rows]

    def hold(self, hold_id: str) -> dict[str, Any]:
        """One hold: its amount, what was released and refunded of it, what remains."""
        found = self.holds(hold_id=hold_id)
        if not found:
            raise UnknownHoldError(f"no hold {hold_id!r}", hold_id=hold_id)
        return found[0]

    def holds(self, *, user: str | None = None, status: str | None = None,
              hold_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Holds (a user's as payer or payee; of a status), newest first, at most `limit`."""
        h = schema.holds
        query = select(h).order_by(h.c.id.desc()).limit(min(max(limit, 1), 10_000))
        if user is not None:
            query = query.where(or_(h.c.payer == user, h.c.payee == user))
        if status is not None:
            query = query.where(h.c.status == status)
        if hold_id is not None:
            query = query.where(h.c.hold_id == hold_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        scale = self.settings.asset_scale
        return [{"hold_id": r.hold_id, "payer": r.payer, "payee": r.payee, "status": r.status,
                 "amount": to_decimal(r.amount_minor, scale),
                 "released": to_decimal(r.released_minor, scale),
                 "refunded": to_decimal(r.refunded_minor, scale),
                 "remaining": to_decimal(r.amount_minor - r.released_minor - r.refunded_minor,
                                         scale),
                 "fee": to_decimal(r.fee_minor or 0, scale), "fee_rate": r.fee_rate,
                 "expires_at": None if r.expires_at is None else iso(as_utc(r.expires_at)),
                 "opened_at": iso(r.created_at),
                 "closed_at": None if r.closed_at is None else iso(r.closed_at)}
                for r in rows]

    def total_supply(self) -> Decimal:
        a = schema.accounts
        with self.engine.connect() as conn:
            minor = conn.execute(select(func.coalesce(func.sum(a.c.balance_minor), 0))
                                 .where(a.c.code == "system:issuance")).scalar_one()
        return to_decimal(-int(minor), self.settings.asset_scale)


def _edge(value: Any) -> Any:
    """Decimals cross into a command as strings; a float never does."""
    if isinstance(value, float):
        raise InvalidCommandError("amounts are Decimal or decimal strings, never float")
    if isinstance(value, Decimal):
        return format(value, "f")
    return value
