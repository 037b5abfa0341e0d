"""payouts: a reference's one payment is a partial unique index on payout_items

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

payout_references (one row, one primary key and two foreign-key checks per paid item)
gives way to payout_items.funding_account_id and a unique index on
(funding_account_id, reference) WHERE outcome = 'paid': still at most one payment of a
reference per funding account, across batches, refused by the database itself.

payout_items also loses its foreign key to payout_batches on PostgreSQL (one more check per
item, ~8 us): items are only written by the chunk that holds its batch's row, batches are
never deleted, and verify's payout check counts each batch's items against its progress.
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
INDEX = 'uq_payout_items_paid_reference'
PAID = sa.text("outcome = 'paid'")
FK = 'fk_payout_items_command_id_payout_batches'

_BACKFILL = (
    'UPDATE payout_items SET funding_account_id = ('
    'SELECT a.id FROM payout_batches b JOIN accounts a ON a.code = b.from_account '
    'WHERE b.command_id = payout_items.command_id)'
)


def _sqlite_append_only(action: str) -> str:
    return (f'CREATE TRIGGER payout_items_append_only_{action.lower()} BEFORE {action} '
            "ON payout_items BEGIN SELECT RAISE(ABORT, 'walletq: payout_items is append-only'); END")


def upgrade() -> None:
    # Items only exist once their batch's funding account was locked: the backfill is total.
    if op.get_bind().dialect.name == 'postgresql':
        op.add_column('payout_items', sa.Column('funding_account_id', BigId, nullable=True))
        op.execute('ALTER TABLE payout_items DISABLE TRIGGER payout_items_append_only')
        op.execute(_BACKFILL)
        op.execute('ALTER TABLE payout_items ENABLE TRIGGER payout_items_append_only')
        op.alter_column('payout_items', 'funding_account_id', nullable=False)
    else:
        # SQLite adds a NOT NULL column only with a default; every row gets its own below.
        op.execute('ALTER TABLE payout_items ADD COLUMN funding_account_id INTEGER NOT NULL '
                   'DEFAULT 0')
        op.execute('DROP TRIGGER payout_items_append_only_update')
        op.execute(_BACKFILL)
        op.execute(_sqlite_append_only('UPDATE'))
    op.create_index(INDEX, 'payout_items', ['funding_account_id', 'reference'], unique=True,
                    postgresql_where=PAID, sqlite_where=PAID)
    op.drop_table('payout_references')
    if op.get_bind().dialect.name == 'postgresql':  # SQLite cannot drop a constraint in place
        op.drop_constraint(FK, 'payout_items', type_='foreignkey')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.create_foreign_key(FK, 'payout_items', 'payout_batches', ['command_id'], ['command_id'])
    op.create_table('payout_references',
    sa.Column('funding_account_id', BigId, autoincrement=False, nullable=False),
    sa.Column('reference', sa.String(length=200), nullable=False),
    sa.Column('command_id', BigId, nullable=False),
    sa.Column('item_index', sa.Integer(), nullable=False),
    sa.CheckConstraint('length(reference) >= 1', name=op.f('ck_payout_references_reference_length')),
    sa.ForeignKeyConstraint(['funding_account_id'], ['accounts.id'],
                            name=op.f('fk_payout_references_funding_account_id_accounts')),
    sa.ForeignKeyConstraint(['command_id', 'item_index'],
                            ['payout_items.command_id', 'payout_items.item_index'],
                            name='fk_payout_references_item_payout_items'),
    sa.PrimaryKeyConstraint('funding_account_id', 'reference', name=op.f('pk_payout_references'))
    )
    op.execute('INSERT INTO payout_references (funding_account_id, reference, command_id, '
               "item_index) SELECT funding_account_id, reference, command_id, item_index "
               "FROM payout_items WHERE outcome = 'paid'")
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('CREATE TRIGGER payout_references_append_only BEFORE UPDATE OR DELETE ON '
                   'payout_references FOR EACH ROW EXECUTE FUNCTION walletq_refuse_change()')
    else:
        for action in ('UPDATE', 'DELETE'):
            op.execute(f'CREATE TRIGGER payout_references_append_only_{action.lower()} BEFORE '
                       f'{action} ON payout_references BEGIN SELECT RAISE(ABORT, '
                       "'walletq: payout_references is append-only'); END")
    op.drop_index(INDEX, table_name='payout_items')
    op.execute('ALTER TABLE payout_items DROP COLUMN funding_account_id')  # SQLite >= 3.35 too
