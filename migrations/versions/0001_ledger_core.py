"""ledger core: accounts, commands, transfers, holds, audit events

Revision ID: 0001
Revises: 
Create Date: 2026-11-29

Transfers and audit events are append-only: a trigger refuses UPDATE and DELETE.
"""

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('code', sa.String(length=220), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('user_id', sa.String(length=200), nullable=True),
    sa.Column('may_go_negative', sa.Boolean(), nullable=False),
    sa.Column('balance_minor', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.CheckConstraint("kind IN ('user_available', 'user_escrow', 'treasury', 'fees', 'issuance', 'external')", name=op.f('ck_accounts_kind')),
    sa.CheckConstraint('length(code) >= 1', name=op.f('ck_accounts_code_length')),
    sa.CheckConstraint('may_go_negative OR balance_minor >= 0', name=op.f('ck_accounts_balance_nonnegative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    sa.UniqueConstraint('code', name=op.f('uq_accounts_code'))
    )
    op.create_table('commands',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('type', sa.String(length=40), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('payload_hash', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=12), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error_code', sa.String(length=40), nullable=True),
    sa.Column('error_message', sa.String(length=2000), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(status IN ('rejected', 'failed')) = (error_code IS NOT NULL)", name=op.f('ck_commands_error_iff_refused')),
    sa.CheckConstraint("status IN ('accepted', 'processing', 'succeeded', 'rejected', 'failed')", name=op.f('ck_commands_status')),
    sa.CheckConstraint('length(idempotency_key) >= 1', name=op.f('ck_commands_key_length')),
    sa.CheckConstraint('length(payload) <= 4194304', name=op.f('ck_commands_payload_length')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_commands')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_commands_idempotency_key'))
    )
    op.create_index('ix_commands_status_updated', 'commands', ['status', 'updated_at'], unique=False)
    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('command_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('command_type', sa.String(length=60), nullable=False),
    sa.Column('outcome', sa.String(length=20), nullable=False),
    sa.Column('error_code', sa.String(length=40), nullable=True),
    sa.Column('accounts', sa.JSON(), nullable=False),
    sa.Column('amounts', sa.JSON(), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['command_id'], ['commands.id'], name=op.f('fk_audit_events_command_id_commands')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_events'))
    )
    op.create_index(op.f('ix_audit_events_command_id'), 'audit_events', ['command_id'], unique=False)
    op.create_table('holds',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('hold_id', sa.String(length=200), nullable=False),
    sa.Column('payer', sa.String(length=200), nullable=False),
    sa.Column('payee', sa.String(length=200), nullable=False),
    sa.Column('amount_minor', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=10), nullable=False),
    sa.Column('fee_minor', sa.BigInteger(), nullable=True),
    sa.Column('fee_rate', sa.String(length=20), nullable=True),
    sa.Column('opened_by', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('closed_by', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(status = 'held') = (closed_by IS NULL)", name=op.f('ck_holds_closed_iff_not_held')),
    sa.CheckConstraint("status IN ('held', 'released', 'refunded')", name=op.f('ck_holds_status')),
    sa.CheckConstraint('amount_minor > 0', name=op.f('ck_holds_amount_positive')),
    sa.CheckConstraint('fee_minor IS NULL OR (fee_minor >= 0 AND fee_minor <= amount_minor)', name=op.f('ck_holds_fee_range')),
    sa.CheckConstraint('payer <> payee', name=op.f('ck_holds_distinct_users')),
    sa.ForeignKeyConstraint(['closed_by'], ['commands.id'], name=op.f('fk_holds_closed_by_commands')),
    sa.ForeignKeyConstraint(['opened_by'], ['commands.id'], name=op.f('fk_holds_opened_by_commands')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_holds')),
    sa.UniqueConstraint('hold_id', name=op.f('uq_holds_hold_id'))
    )
    op.create_index('ix_holds_payer_status', 'holds', ['payer', 'status'], unique=False)
    op.create_table('transfers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('command_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('debit_account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('credit_account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('amount_minor', sa.BigInteger(), nullable=False),
    sa.Column('kind', sa.String(length=30), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.CheckConstraint('amount_minor > 0', name=op.f('ck_transfers_amount_positive')),
    sa.CheckConstraint('debit_account_id <> credit_account_id', name=op.f('ck_transfers_distinct_accounts')),
    sa.ForeignKeyConstraint(['command_id'], ['commands.id'], name=op.f('fk_transfers_command_id_commands')),
    sa.ForeignKeyConstraint(['credit_account_id'], ['accounts.id'], name=op.f('fk_transfers_credit_account_id_accounts')),
    sa.ForeignKeyConstraint(['debit_account_id'], ['accounts.id'], name=op.f('fk_transfers_debit_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_transfers'))
    )
    op.create_index(op.f('ix_transfers_command_id'), 'transfers', ['command_id'], unique=False)
    op.create_index(op.f('ix_transfers_credit_account_id'), 'transfers', ['credit_account_id'], unique=False)
    op.create_index(op.f('ix_transfers_debit_account_id'), 'transfers', ['debit_account_id'], unique=False)
    _append_only("transfers")
    _append_only("audit_events")


APPEND_ONLY_FUNCTION = """
CREATE OR REPLACE FUNCTION walletq_refuse_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'walletq: % is append-only; % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END;
$$ LANGUAGE plpgsql
"""


def _append_only(table: str) -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(APPEND_ONLY_FUNCTION)
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION walletq_refuse_change()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_append_only_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'walletq: {table} is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS walletq_refuse_change() CASCADE")
    op.drop_index(op.f('ix_transfers_debit_account_id'), table_name='transfers')
    op.drop_index(op.f('ix_transfers_credit_account_id'), table_name='transfers')
    op.drop_index(op.f('ix_transfers_command_id'), table_name='transfers')
    op.drop_table('transfers')
    op.drop_index('ix_holds_payer_status', table_name='holds')
    op.drop_table('holds')
    op.drop_index(op.f('ix_audit_events_command_id'), table_name='audit_events')
    op.drop_table('audit_events')
    op.drop_index('ix_commands_status_updated', table_name='commands')
    op.drop_table('commands')
    op.drop_table('accounts')
