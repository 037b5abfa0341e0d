"""The tables, as SQLAlchemy Core metadata (the migrations create them; this reads them).

Amounts are BIGINT minor units. What must never happen is refused by the database
itself: negative balances where not allowed, non-positive transfers, self-transfers,
duplicate idempotency keys, over-long text.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    or_,
)

from services import command_status

__all__ = ["metadata", "accounts", "commands", "transfers", "holds", "audit_events",
           "payout_batches", "payout_items", "roles", "role_permissions", "producers",
           "producer_permissions", "producer_keys", "refusals", "signature_epoch",
           "account_events", "reversals", "FREEZE_DIRECTIONS", "ACCOUNT_EVENTS"]

ID_LENGTH_MAX = 200
ACCOUNT_CODE_LENGTH_MAX = 220

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


def _now() -> Column:  # type: ignore[type-arg]
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


accounts = Table(
    "accounts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("code", String(ACCOUNT_CODE_LENGTH_MAX), nullable=False, unique=True),
    Column("kind", String(20), nullable=False),
    Column("user_id", String(ID_LENGTH_MAX)),
    Column("may_go_negative", Boolean, nullable=False),
    Column("balance_minor", BigInteger, nullable=False, server_default="0"),
    _now(),
    # Migration 0007 (docs/ARCHITECTURE.md, "Accounts: limits, freezes, closing"): a user's
    # available account may go down to -overdraft_limit_minor; a freeze refuses its debits
    # ('debits') or everything ('both') until frozen_until (NULL: until unfrozen); a closed
    # account takes nothing.
    Column("overdraft_limit_minor", BigInteger, nullable=False, server_default="0"),
    Column("frozen", String(10)),
    Column("frozen_until", DateTime(timezone=True)),
    Column("closed_at", DateTime(timezone=True)),
    # The most its debits may take in one UTC day (NULL: no velocity limit).
    Column("daily_debit_limit_minor", BigInteger),
    CheckConstraint("daily_debit_limit_minor IS NULL OR (daily_debit_limit_minor > 0 AND "
                    "kind = 'user_available')", name="daily_debit_limit"),
    CheckConstraint("may_go_negative OR balance_minor >= -overdraft_limit_minor",
                    name="balance_nonnegative"),
    CheckConstraint("overdraft_limit_minor >= 0 AND "
                    "(overdraft_limit_minor = 0 OR kind = 'user_available')",
                    name="overdraft_limit"),
    CheckConstraint("frozen IS NULL OR frozen IN ('debits', 'both')", name="frozen"),
    CheckConstraint(
        "kind IN ('user_available', 'user_escrow', 'treasury', 'fees', 'issuance', 'external')",
        name="kind",
    ),
    CheckConstraint("length(code) >= 1", name="code_length"),
)

COMMAND_STATUSES = command_status.ALL

commands = Table(
    "commands",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(ID_LENGTH_MAX), nullable=False, unique=True),
    Column("type", String(40), nullable=False),
    Column("payload", Text, nullable=False),
    Column("payload_hash", String(64), nullable=False),
    Column("status", String(12), nullable=False),
    Column("result", JSON),
    Column("error_code", String(40)),
    Column("error_message", String(2000)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("completed_at", DateTime(timezone=True)),
    # Migration 0004: the producer the command names, what it signed (the JCS text of the
    # command as sent, without its signature) and the signature, as first accepted; the
    # worker and `walletq verify` re-verify them. NULL only before migration 0004.
    Column("producer", String(ID_LENGTH_MAX)),
    Column("signed_payload", Text),
    Column("signature", String(86)),
    CheckConstraint(f"status IN ({', '.join(repr(s) for s in COMMAND_STATUSES)})", name="status"),
    CheckConstraint("length(idempotency_key) >= 1", name="key_length"),
    # On PostgreSQL (migration 0008) `octet_length(payload) <= 4194304 OR` this: the same
    # texts admitted, without reading a stored payload at each update of its row.
    CheckConstraint("length(payload) <= 4194304", name="payload_length"),
    CheckConstraint(
        "(status IN ('rejected', 'failed')) = (error_code IS NOT NULL)", name="error_iff_refused"
    ),
    CheckConstraint("length(signed_payload) <= 4194304", name="signed_payload_length"),
)
# Migration 0009: the few accounts closed or frozen, found by code without probing the
# unique index once per code (a payout's recipients: services.ledger.recipients_blocked).
_BLOCKED_ACCOUNT = or_(accounts.c.closed_at.is_not(None), accounts.c.frozen.is_not(None))
Index("ix_accounts_blocked_code", accounts.c.code, postgresql_where=_BLOCKED_ACCOUNT,
      sqlite_where=_BLOCKED_ACCOUNT)
Index("ix_commands_status_updated", commands.c.status, commands.c.updated_at)

transfers = Table(
    "transfers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    # No foreign keys on PostgreSQL (migration 0008: three lookups per row): one trigger per
    # statement looks each distinct command and account up, and neither is ever deleted.
    Column("command_id", BigId, nullable=False, index=True),
    Column("debit_account_id", BigId, nullable=False),
    Column("credit_account_id", BigId, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("kind", String(30), nullable=False),
    _now(),
    # Migration 0007: each leg's account balance right after it (the running balance that
    # `balance --at`, `history` and `statement` read; verify holds the chain together).
    Column("debit_balance_after_minor", BigInteger),
    Column("credit_balance_after_minor", BigInteger),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
    CheckConstraint("debit_account_id <> credit_account_id", name="distinct_accounts"),
)
# Migration 0007: an account's legs by time (balance at a moment: the last leg before it).
Index("ix_transfers_debit_account_at", transfers.c.debit_account_id, transfers.c.created_at,
      transfers.c.id)
Index("ix_transfers_credit_account_at", transfers.c.credit_account_id, transfers.c.created_at,
      transfers.c.id)

HOLD_STATUSES = ("held", "released", "refunded")

holds = Table(
    "holds",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("hold_id", String(ID_LENGTH_MAX), nullable=False, unique=True),
    Column("payer", String(ID_LENGTH_MAX), nullable=False),
    Column("payee", String(ID_LENGTH_MAX), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("status", String(10), nullable=False),
    Column("fee_minor", BigInteger),
    Column("fee_rate", String(20)),
    # The commands that opened and closed it: checked once per statement on PostgreSQL
    # (migration 0010), foreign keys on SQLite.
    Column("opened_by", BigId, nullable=False),
    Column("closed_by", BigId),
    _now(),
    Column("closed_at", DateTime(timezone=True)),
    # Migration 0006: partial capture and expiry (services.hold_rules). What remains held is
    # amount − released − refunded; the hold is open exactly while something remains.
    Column("released_minor", BigInteger, nullable=False, server_default="0"),
    Column("refunded_minor", BigInteger, nullable=False, server_default="0"),
    Column("expires_at", DateTime(timezone=True)),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
    CheckConstraint("payer <> payee", name="distinct_users"),
    CheckConstraint("status IN ('held', 'released', 'refunded', 'expired')", name="status"),
    CheckConstraint("released_minor >= 0 AND refunded_minor >= 0", name="parts_non_negative"),
    CheckConstraint("released_minor + refunded_minor <= amount_minor", name="parts_within_amount"),
    CheckConstraint("(status = 'held') = (released_minor + refunded_minor < amount_minor)",
                    name="open_iff_remaining"),
    CheckConstraint("fee_minor IS NULL OR (fee_minor >= 0 AND fee_minor <= amount_minor)",
                    name="fee_range"),
    CheckConstraint("(status = 'held') = (closed_by IS NULL)", name="closed_iff_not_held"),
)
# Open holds only (migration 0011): a payer's open holds, the expiry pass's holds due; a
# hold that closes leaves both.
_OPEN_HOLD = holds.c.status == "held"
Index("ix_holds_open_payer", holds.c.payer, postgresql_where=_OPEN_HOLD, sqlite_where=_OPEN_HOLD)
Index("ix_holds_open_expires_at", holds.c.expires_at, postgresql_where=_OPEN_HOLD,
      sqlite_where=_OPEN_HOLD)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    # Checked once per statement on PostgreSQL (migration 0010), a foreign key on SQLite.
    Column("command_id", BigId, index=True),
    Column("idempotency_key", String(ID_LENGTH_MAX)),
    Column("command_type", String(60), nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("error_code", String(40)),
    Column("accounts", JSON, nullable=False),
    Column("amounts", JSON, nullable=False),
    Column("detail", JSON, nullable=False),
    _now(),
)


# --- payout batches (migration 0002) ----------------------------------------------------

PAYOUT_BATCH_STATUSES = ("running", "succeeded", "rejected")
PAYOUT_OUTCOMES = ("paid", "rejected", "duplicate")

# One row per payout_batch command: its progress, committed with each chunk it applies.
payout_batches = Table(
    "payout_batches",
    metadata,
    Column("command_id", BigId, ForeignKey("commands.id"), primary_key=True, autoincrement=False),
    Column("from_account", String(ACCOUNT_CODE_LENGTH_MAX), nullable=False),
    Column("atomic", Boolean, nullable=False),
    Column("status", String(12), nullable=False),
    Column("items_total", Integer, nullable=False),
    Column("amount_total_minor", BigInteger, nullable=False),
    Column("chunk_items", Integer, nullable=False),
    Column("chunks_total", Integer, nullable=False),
    Column("chunks_done", Integer, nullable=False, server_default="0"),
    Column("items_paid", Integer, nullable=False, server_default="0"),
    Column("items_rejected", Integer, nullable=False, server_default="0"),
    Column("items_duplicate", Integer, nullable=False, server_default="0"),
    Column("amount_paid_minor", BigInteger, nullable=False, server_default="0"),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("completed_at", DateTime(timezone=True)),
    CheckConstraint("status IN ('running', 'succeeded', 'rejected')", name="status"),
    CheckConstraint("items_total >= 1 AND items_total <= 1000000", name="items_total_range"),
    CheckConstraint("amount_total_minor > 0", name="amount_total_positive"),
    CheckConstraint("chunk_items >= 1 AND chunks_total >= 1", name="chunks_positive"),
    CheckConstraint("chunks_done >= 0 AND chunks_done <= chunks_total", name="chunks_done_range"),
    CheckConstraint(
        "items_paid >= 0 AND items_rejected >= 0 AND items_duplicate >= 0 AND "
        "items_paid + items_rejected + items_duplicate <= items_total",
        name="items_range",
    ),
    CheckConstraint("amount_paid_minor >= 0 AND amount_paid_minor <= amount_total_minor",
                    name="amount_paid_range"),
    CheckConstraint("(items_paid = 0) = (amount_paid_minor = 0)", name="paid_iff_amount"),
    CheckConstraint(
        "status <> 'succeeded' OR (chunks_done = chunks_total AND "
        "items_paid + items_rejected + items_duplicate = items_total)",
        name="succeeded_iff_complete",
    ),
    CheckConstraint("status <> 'rejected' OR items_paid = 0", name="rejected_pays_nothing"),
    CheckConstraint("length(from_account) >= 1", name="from_account_length"),
)

# One row per item applied (appended with its chunk); items not yet reached have no row.
payout_items = Table(
    "payout_items",
    metadata,
    # No foreign key to payout_batches (migration 0003: ~8 us per item): only the chunk
    # holding its batch's row writes items, and verify counts them against the batch.
    Column("command_id", BigId, primary_key=True, autoincrement=False),
    Column("item_index", Integer, primary_key=True, autoincrement=False),
    Column("user_id", String(ID_LENGTH_MAX), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("reference", String(ID_LENGTH_MAX), nullable=False),
    Column("outcome", String(10), nullable=False),
    Column("error_code", String(40)),
    # The batch's funding account (migration 0003): a reference is paid at most once per
    # funding account, across every batch — the partial unique index below.
    Column("funding_account_id", BigId, nullable=False),
    CheckConstraint("item_index >= 0", name="index_nonnegative"),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
    CheckConstraint("outcome IN ('paid', 'rejected', 'duplicate')", name="outcome"),
    CheckConstraint("(outcome = 'rejected') = (error_code IS NOT NULL)", name="error_iff_rejected"),
    CheckConstraint("length(user_id) >= 1 AND length(reference) >= 1", name="ids_length"),
)
Index("uq_payout_items_paid_reference", payout_items.c.funding_account_id,
      payout_items.c.reference, unique=True, postgresql_where=payout_items.c.outcome == "paid",
      sqlite_where=payout_items.c.outcome == "paid")


# --- producers and their refusals (migration 0004) ---------------------------------------

ROLE_NAME_LENGTH_MAX = 40
PERMISSION_LENGTH_MAX = 60
PRODUCER_STATUSES = ("active", "revoked")

# A role is a named set of permissions (services.permissions): command types and overrides.
roles = Table(
    "roles",
    metadata,
    Column("name", String(ROLE_NAME_LENGTH_MAX), primary_key=True),
    Column("description", String(200), nullable=False),
    _now(),
)

role_permissions = Table(
    "role_permissions",
    metadata,
    Column("role", String(ROLE_NAME_LENGTH_MAX), ForeignKey("roles.name"), primary_key=True),
    Column("permission", String(PERMISSION_LENGTH_MAX), primary_key=True),
)

producers = Table(
    "producers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("name", String(ID_LENGTH_MAX), nullable=False, unique=True),
    Column("role", String(ROLE_NAME_LENGTH_MAX), ForeignKey("roles.name"), nullable=False),
    Column("status", String(10), nullable=False),
    _now(),
    Column("revoked_at", DateTime(timezone=True)),
    CheckConstraint("status IN ('active', 'revoked')", name="status"),
    CheckConstraint("(status = 'revoked') = (revoked_at IS NOT NULL)", name="revoked_iff_time"),
    CheckConstraint("length(name) >= 1", name="name_length"),
)

# Permissions granted to one producer beyond its role's (`--allow`).
producer_permissions = Table(
    "producer_permissions",
    metadata,
    Column("producer_id", BigId, ForeignKey("producers.id"), primary_key=True,
           autoincrement=False),
    Column("permission", String(PERMISSION_LENGTH_MAX), primary_key=True),
)

# A producer's Ed25519 public keys: 32 raw bytes, base64url. A key verifies a command
# accepted in [valid_from, valid_until) and never once revoked; rotation ends the old key's
# validity (commands it signed before stay verifiable), revocation ends everything.
producer_keys = Table(
    "producer_keys",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("producer_id", BigId, ForeignKey("producers.id"), nullable=False, index=True),
    Column("key_id", String(16), nullable=False, unique=True),
    Column("public_key", String(43), nullable=False, unique=True),
    Column("valid_from", DateTime(timezone=True), nullable=False),
    Column("valid_until", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    _now(),
    CheckConstraint("valid_until IS NULL OR valid_until >= valid_from", name="validity_order"),
    CheckConstraint("length(public_key) = 43 AND length(key_id) = 16", name="key_length"),
)

# Refusals that take no idempotency key (unauthenticated, forbidden, a conflicting replay,
# an invalid command whose key is taken or unusable): readable by key and producer, so a
# producer learns its command's fate without the refusal squatting the key. Append-only.
refusals = Table(
    "refusals",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(ID_LENGTH_MAX)),
    Column("producer", String(ID_LENGTH_MAX)),
    # True when the producer's signature verified (forbidden, conflict, invalid): the
    # producer named is the sender. False: anyone may have claimed that name.
    Column("authenticated", Boolean, nullable=False),
    Column("command_type", String(PERMISSION_LENGTH_MAX)),
    Column("error_code", String(40), nullable=False),
    Column("error_message", String(2000), nullable=False),
    Column("source", String(20), nullable=False),
    _now(),
)
Index("ix_refusals_key", refusals.c.idempotency_key)

# One row: the largest command id accepted before commands were signed (migration 0004).
# verify accepts an unsigned command only at or below it.
signature_epoch = Table(
    "signature_epoch",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("legacy_command_id_max", BigInteger, nullable=False),
    _now(),
    CheckConstraint("id = 1", name="one_row"),
)


# --- account lifecycle and reversals (migration 0007) ---------------------------------------

FREEZE_DIRECTIONS = ("debits", "both")
ACCOUNT_EVENTS = ("set_limit", "freeze", "unfreeze", "close")

# What happened to an account besides its money: limits set, freezes, unfreezes, closing;
# one row per succeeded admin command. Append-only; `verify` reads the freezes back.
account_events = Table(
    "account_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("account_id", BigId, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("command_id", BigId, ForeignKey("commands.id"), nullable=False),
    Column("event", String(12), nullable=False),
    Column("direction", String(10)),
    Column("until", DateTime(timezone=True)),
    Column("limit_minor", BigInteger),
    Column("daily_debit_limit_minor", BigInteger),
    Column("reason", String(500)),
    # The account's last transfer when the event happened (its row locked, this
    # transaction's earlier legs written first): verify orders legs and events by it.
    Column("transfer_id_max", BigInteger),
    _now(),
    CheckConstraint("event IN ('set_limit', 'freeze', 'unfreeze', 'close')", name="event"),
    CheckConstraint("(event = 'freeze') = (direction IS NOT NULL)", name="direction_iff_freeze"),
    CheckConstraint("direction IS NULL OR direction IN ('debits', 'both')", name="direction"),
    CheckConstraint("(event = 'set_limit') = (limit_minor IS NOT NULL)", name="limit_iff_set"),
)

# A succeeded command and the command that reversed it: one reversal per original (the
# unique index), never a reversal of a reversal. Append-only.
reversals = Table(
    "reversals",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("command_id", BigId, ForeignKey("commands.id"), nullable=False, unique=True),
    Column("original_command_id", BigId, ForeignKey("commands.id"), nullable=False, unique=True),
    Column("reason", String(500), nullable=False),
    _now(),
    CheckConstraint("command_id <> original_command_id", name="distinct_commands"),
)
