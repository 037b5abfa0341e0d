"""payouts: payout_batches (progress per chunk), payout_items (outcomes), payout_references

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

A reference is paid at most once per funding account: the primary key of payout_references.
Items and references are append-only, like transfers.
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def _ck(table: str, name: str, sql: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(sql, name=op.f(f'ck_{table}_{name}'))


def upgrade() -> None:
    op.create_table('payout_batches',
    sa.Column('command_id', BigId, autoincrement=False, nullable=False),
    sa.Column('from_account', sa.String(length=220), nullable=False),
    sa.Column('atomic', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=12), nullable=False),
    sa.Column('items_total', sa.Integer(), nullable=False),
    sa.Column('amount_total_minor', sa.BigInteger(), nullable=False),
    sa.Column('chunk_items', sa.Integer(), nullable=False),
    sa.Column('chunks_total', sa.Integer(), nullable=False),
    sa.Column('chunks_done', sa.Integer(), server_default='0', nullable=False),
    sa.Column('items_paid', sa.Integer(), server_default='0', nullable=False),
    sa.Column('items_rejected', sa.Integer(), server_default='0', nullable=False),
    sa.Column('items_duplicate', sa.Integer(), server_default='0', nullable=False),
    sa.Column('amount_paid_minor', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    _ck('payout_batches', 'status',
        "status IN ('running', 'succeeded', 'rejected')"),
    _ck('payout_batches', 'items_total_range',
        'items_total >= 1 AND items_total <= 1000000'),
    _ck('payout_batches', 'amount_total_positive',
        'amount_total_minor > 0'),
    _ck('payout_batches', 'chunks_positive',
        'chunk_items >= 1 AND chunks_total >= 1'),
    _ck('payout_batches', 'chunks_done_range',
        'chunks_done >= 0 AND chunks_done <= chunks_total'),
    _ck('payout_batches', 'items_range',
        'items_paid >= 0 AND items_rejected >= 0 AND items_duplicate >= 0 AND '
        'items_paid + items_rejected + items_duplicate <= items_total'),
    _ck('payout_batches', 'amount_paid_range',
        'amount_paid_minor >= 0 AND amount_paid_minor <= amount_total_minor'),
    _ck('payout_batches', 'paid_iff_amount',
        '(items_paid = 0) = (amount_paid_minor = 0)'),
    _ck('payout_batches', 'succeeded_iff_complete',
        "status <> 'succeeded' OR (chunks_done = chunks_total AND "
        "items_paid + items_rejected + items_duplicate = items_total)"),
    _ck('payout_batches', 'rejected_pays_nothing',
        "status <> 'rejected' OR items_paid = 0"),
    _ck('payout_batches', 'from_account_length',
        'length(from_account) >= 1'),
    sa.ForeignKeyConstraint(['command_id'], ['commands.id'],
                            name=op.f('fk_payout_batches_command_id_commands')),
    sa.PrimaryKeyConstraint('command_id', name=op.f('pk_payout_batches'))
    )
    op.create_table('payout_items',
    sa.Column('command_id', BigId, autoincrement=False, nullable=False),
    sa.Column('item_index', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('user_id', sa.String(length=200), nullable=False),
    sa.Column('amount_minor', sa.BigInteger(), nullable=False),
    sa.Column('reference', sa.String(length=200), nullable=False),
    sa.Column('outcome', sa.String(length=10), nullable=False),
    sa.Column('error_code', sa.String(length=40), nullable=True),
    _ck('payout_items', 'index_nonnegative',
        'item_index >= 0'),
    _ck('payout_items', 'amount_positive',
        'amount_minor > 0'),
    _ck('payout_items', 'outcome',
        "outcome IN ('paid', 'rejected', 'duplicate')"),
    _ck('payout_items', 'error_iff_rejected',
        "(outcome = 'rejected') = (error_code IS NOT NULL)"),
    _ck('payout_items', 'ids_length',
        'length(user_id) >= 1 AND length(reference) >= 1'),
    sa.ForeignKeyConstraint(['command_id'], ['payout_batches.command_id'],
                            name=op.f('fk_payout_items_command_id_payout_batches')),
    sa.PrimaryKeyConstraint('command_id', 'item_index', name=op.f('pk_payout_items'))
    )
    op.create_table('payout_references',
    sa.Column('funding_account_id', BigId, autoincrement=False, nullable=False),
    sa.Column('reference', sa.String(length=200), nullable=False),
    sa.Column('command_id', BigId, nullable=False),
    sa.Column('item_index', sa.Integer(), nullable=False),
    _ck('payout_references', 'reference_length',
        'length(reference) >= 1'),
    sa.ForeignKeyConstraint(['funding_account_id'], ['accounts.id'],
                            name=op.f('fk_payout_references_funding_account_id_accounts')),
    sa.ForeignKeyConstraint(['command_id', 'item_index'],
                            ['payout_items.command_id', 'payout_items.item_index'],
                            name='fk_payout_references_item_payout_items'),
    sa.PrimaryKeyConstraint('funding_account_id', 'reference', name=op.f('pk_payout_references'))
    )
    _append_only('payout_items')
    _append_only('payout_references')


def _append_only(table: str) -> None:
    # walletq_refuse_change() comes from 0001.
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(
            f'CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} '
            'FOR EACH ROW EXECUTE FUNCTION walletq_refuse_change()'
        )
    else:
        for action in ('UPDATE', 'DELETE'):
            op.execute(
                f'CREATE TRIGGER {table}_append_only_{action.lower()} BEFORE {action} ON {table} '
                f"BEGIN SELECT RAISE(ABORT, 'walletq: {table} is append-only'); END"
            )


def downgrade() -> None:
    op.drop_table('payout_references')
    op.drop_table('payout_items')
    op.drop_table('payout_batches')
