"""account lifecycle: overdraft limits, freezes, closing, reversals, balance after each leg

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-30

Accounts get an overdraft limit (a user's available account may go down to -limit, and the
CHECK constraint says so), a freeze (debits, or both directions, until a time or until
unfrozen) and a closing time. Every transfer records each account's balance after it,
backfilled here as each account's running sum in transfer id order (invariant 3 makes the
last one its balance). `account_events` and `reversals` are append-only, like 0001/0005.
The integrator chains this after 0006 (the holds' half of issue 9).
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
NEW_TABLES = ('account_events', 'reversals')
BALANCE_CHECK = 'may_go_negative OR balance_minor >= -overdraft_limit_minor'
LIMIT_CHECK = ("overdraft_limit_minor >= 0 AND "
               "(overdraft_limit_minor = 0 OR kind = 'user_available')")
FROZEN_CHECK = "frozen IS NULL OR frozen IN ('debits', 'both')"
DAILY_CHECK = ("daily_debit_limit_minor IS NULL OR (daily_debit_limit_minor > 0 AND "
               "kind = 'user_available')")

# Each leg's running balance per account, in transfer id order, from zero.
BACKFILL_PG = """
WITH legs AS (
    SELECT id, debit_account_id AS account_id, -amount_minor AS delta, 0 AS side FROM transfers
    UNION ALL
    SELECT id, credit_account_id, amount_minor, 1 FROM transfers),
run AS (
    SELECT id, side, SUM(delta) OVER (PARTITION BY account_id ORDER BY id, side
                                      ROWS UNBOUNDED PRECEDING) AS after
    FROM legs)
UPDATE transfers t SET debit_balance_after_minor = d.after, credit_balance_after_minor = c.after
FROM run d, run c
WHERE d.id = t.id AND d.side = 0 AND c.id = t.id AND c.side = 1
"""
BACKFILL_SQLITE = """
WITH legs AS (
    SELECT id, debit_account_id AS account_id, -amount_minor AS delta, 0 AS side FROM transfers
    UNION ALL
    SELECT id, credit_account_id, amount_minor, 1 FROM transfers),
run AS (
    SELECT id, side, SUM(delta) OVER (PARTITION BY account_id ORDER BY id, side
                                      ROWS UNBOUNDED PRECEDING) AS after
    FROM legs)
UPDATE transfers SET
    debit_balance_after_minor = (SELECT after FROM run WHERE run.id = transfers.id AND side = 0),
    credit_balance_after_minor = (SELECT after FROM run WHERE run.id = transfers.id AND side = 1)
"""


def _accounts_before() -> sa.Table:
    """The accounts table as 0001 made it (SQLite's downgrade rebuilds it so)."""
    return sa.Table(
        'accounts', sa.MetaData(),
        sa.Column('id', BigId, primary_key=True, autoincrement=True),
        sa.Column('code', sa.String(220), nullable=False),
        sa.Column('kind', sa.String(20), nullable=False),
        sa.Column('user_id', sa.String(200)),
        sa.Column('may_go_negative', sa.Boolean(), nullable=False),
        sa.Column('balance_minor', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.CheckConstraint("kind IN ('user_available', 'user_escrow', 'treasury', 'fees', "
                           "'issuance', 'external')", name='ck_accounts_kind'),
        sa.CheckConstraint('length(code) >= 1', name='ck_accounts_code_length'),
        sa.CheckConstraint('may_go_negative OR balance_minor >= 0',
                           name='ck_accounts_balance_nonnegative'),
        sa.UniqueConstraint('code', name='uq_accounts_code'),
    )


def _accounts_as_now() -> sa.Table:
    """The accounts table as this revision leaves it (SQLite rebuilds it to change a CHECK)."""
    return sa.Table(
        'accounts', sa.MetaData(),
        sa.Column('id', BigId, primary_key=True, autoincrement=True),
        sa.Column('code', sa.String(220), nullable=False),
        sa.Column('kind', sa.String(20), nullable=False),
        sa.Column('user_id', sa.String(200)),
        sa.Column('may_go_negative', sa.Boolean(), nullable=False),
        sa.Column('balance_minor', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.Column('overdraft_limit_minor', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('frozen', sa.String(10)),
        sa.Column('frozen_until', sa.DateTime(timezone=True)),
        sa.Column('closed_at', sa.DateTime(timezone=True)),
        sa.Column('daily_debit_limit_minor', sa.BigInteger()),
        sa.CheckConstraint(DAILY_CHECK, name='ck_accounts_daily_debit_limit'),
        sa.CheckConstraint("kind IN ('user_available', 'user_escrow', 'treasury', 'fees', "
                           "'issuance', 'external')", name='ck_accounts_kind'),
        sa.CheckConstraint('length(code) >= 1', name='ck_accounts_code_length'),
        sa.CheckConstraint(BALANCE_CHECK, name='ck_accounts_balance_nonnegative'),
        sa.CheckConstraint(LIMIT_CHECK, name='ck_accounts_overdraft_limit'),
        sa.CheckConstraint(FROZEN_CHECK, name='ck_accounts_frozen'),
        sa.UniqueConstraint('code', name='uq_accounts_code'),
    )


def _accounts() -> None:
    op.add_column('accounts', sa.Column('overdraft_limit_minor', sa.BigInteger(),
                                        server_default='0', nullable=False))
    op.add_column('accounts', sa.Column('frozen', sa.String(10), nullable=True))
    op.add_column('accounts', sa.Column('frozen_until', sa.DateTime(timezone=True), nullable=True))
    op.add_column('accounts', sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('accounts', sa.Column('daily_debit_limit_minor', sa.BigInteger(),
                                        nullable=True))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE accounts DROP CONSTRAINT ck_accounts_balance_nonnegative')
        op.execute(f'ALTER TABLE accounts ADD CONSTRAINT ck_accounts_balance_nonnegative '
                   f'CHECK ({BALANCE_CHECK})')
        op.execute(f'ALTER TABLE accounts ADD CONSTRAINT ck_accounts_overdraft_limit '
                   f'CHECK ({LIMIT_CHECK})')
        op.execute(f'ALTER TABLE accounts ADD CONSTRAINT ck_accounts_frozen CHECK ({FROZEN_CHECK})')
        op.execute(f'ALTER TABLE accounts ADD CONSTRAINT ck_accounts_daily_debit_limit '
                   f'CHECK ({DAILY_CHECK})')
        return
    with op.batch_alter_table('accounts', copy_from=_accounts_as_now(), recreate='always'):
        pass


def _transfers() -> None:
    op.add_column('transfers', sa.Column('debit_balance_after_minor', sa.BigInteger(),
                                         nullable=True))
    op.add_column('transfers', sa.Column('credit_balance_after_minor', sa.BigInteger(),
                                         nullable=True))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE transfers DISABLE TRIGGER transfers_append_only')
        op.execute(BACKFILL_PG)
        op.execute('ALTER TABLE transfers ENABLE TRIGGER transfers_append_only')
    else:
        op.execute('DROP TRIGGER transfers_append_only_update')
        op.execute(BACKFILL_SQLITE)
        op.execute("CREATE TRIGGER transfers_append_only_update BEFORE UPDATE ON transfers "
                   "BEGIN SELECT RAISE(ABORT, 'walletq: transfers is append-only'); END")
    op.drop_index('ix_transfers_debit_account_id', table_name='transfers')
    op.drop_index('ix_transfers_credit_account_id', table_name='transfers')
    op.create_index('ix_transfers_debit_account_at', 'transfers',
                    ['debit_account_id', 'created_at', 'id'])
    op.create_index('ix_transfers_credit_account_at', 'transfers',
                    ['credit_account_id', 'created_at', 'id'])


def _new_tables() -> None:
    op.create_table(
        'account_events',
        sa.Column('id', BigId, autoincrement=True, nullable=False),
        sa.Column('account_id', BigId, nullable=False),
        sa.Column('command_id', BigId, nullable=False),
        sa.Column('event', sa.String(12), nullable=False),
        sa.Column('direction', sa.String(10), nullable=True),
        sa.Column('until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('limit_minor', sa.BigInteger(), nullable=True),
        sa.Column('daily_debit_limit_minor', sa.BigInteger(), nullable=True),
        sa.Column('reason', sa.String(500), nullable=True),
        sa.Column('transfer_id_max', sa.BigInteger(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.CheckConstraint("event IN ('set_limit', 'freeze', 'unfreeze', 'close')",
                           name='ck_account_events_event'),
        sa.CheckConstraint("(event = 'freeze') = (direction IS NOT NULL)",
                           name='ck_account_events_direction_iff_freeze'),
        sa.CheckConstraint("direction IS NULL OR direction IN ('debits', 'both')",
                           name='ck_account_events_direction'),
        sa.CheckConstraint("(event = 'set_limit') = (limit_minor IS NOT NULL)",
                           name='ck_account_events_limit_iff_set'),
        sa.ForeignKeyConstraint(['account_id'], ['accounts.id'],
                                name='fk_account_events_account_id_accounts'),
        sa.ForeignKeyConstraint(['command_id'], ['commands.id'],
                                name='fk_account_events_command_id_commands'),
        sa.PrimaryKeyConstraint('id', name='pk_account_events'),
    )
    op.create_index('ix_account_events_account_id', 'account_events', ['account_id'])
    op.create_table(
        'reversals',
        sa.Column('id', BigId, autoincrement=True, nullable=False),
        sa.Column('command_id', BigId, nullable=False),
        sa.Column('original_command_id', BigId, nullable=False),
        sa.Column('reason', sa.String(500), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.CheckConstraint('command_id <> original_command_id',
                           name='ck_reversals_distinct_commands'),
        sa.ForeignKeyConstraint(['command_id'], ['commands.id'],
                                name='fk_reversals_command_id_commands'),
        sa.ForeignKeyConstraint(['original_command_id'], ['commands.id'],
                                name='fk_reversals_original_command_id_commands'),
        sa.PrimaryKeyConstraint('id', name='pk_reversals'),
        sa.UniqueConstraint('command_id', name='uq_reversals_command_id'),
        sa.UniqueConstraint('original_command_id', name='uq_reversals_original_command_id'),
    )
    for table in NEW_TABLES:
        _append_only(table)


def _append_only(table: str) -> None:
    """UPDATE, DELETE and TRUNCATE refused, as 0001 and 0005 do for the other ledgers."""
    if op.get_bind().dialect.name == 'postgresql':
        for event, level in (('UPDATE OR DELETE', 'ROW'), ('TRUNCATE', 'STATEMENT')):
            name = 'append_only' if level == 'ROW' else 'no_truncate'
            op.execute(f'CREATE TRIGGER {table}_{name} BEFORE {event} ON {table} '
                       f'FOR EACH {level} EXECUTE FUNCTION walletq_refuse_change()')
        return
    for action in ('UPDATE', 'DELETE'):
        op.execute(f"CREATE TRIGGER {table}_append_only_{action.lower()} BEFORE {action} "
                   f"ON {table} BEGIN SELECT RAISE(ABORT, 'walletq: {table} is append-only'); END")


def upgrade() -> None:
    _accounts()
    _transfers()
    _new_tables()


def downgrade() -> None:
    for table in reversed(NEW_TABLES):
        op.drop_table(table)
    op.drop_index('ix_transfers_credit_account_at', table_name='transfers')
    op.drop_index('ix_transfers_debit_account_at', table_name='transfers')
    op.create_index('ix_transfers_debit_account_id', 'transfers', ['debit_account_id'])
    op.create_index('ix_transfers_credit_account_id', 'transfers', ['credit_account_id'])
    with op.batch_alter_table('transfers') as batch:
        batch.drop_column('credit_balance_after_minor')
        batch.drop_column('debit_balance_after_minor')
    if op.get_bind().dialect.name != 'postgresql':  # SQLite rebuilt it: its triggers again
        for action in ('UPDATE', 'DELETE'):
            op.execute(f'DROP TRIGGER IF EXISTS transfers_append_only_{action.lower()}')
            op.execute(f"CREATE TRIGGER transfers_append_only_{action.lower()} BEFORE {action} "
                       "ON transfers BEGIN SELECT RAISE(ABORT, 'walletq: transfers is "
                       "append-only'); END")
    if op.get_bind().dialect.name != 'postgresql':
        with op.batch_alter_table('accounts', copy_from=_accounts_before(), recreate='always'):
            pass
        return
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE accounts DROP CONSTRAINT ck_accounts_daily_debit_limit')
        op.execute('ALTER TABLE accounts DROP CONSTRAINT ck_accounts_frozen')
        op.execute('ALTER TABLE accounts DROP CONSTRAINT ck_accounts_overdraft_limit')
        op.execute('ALTER TABLE accounts DROP CONSTRAINT ck_accounts_balance_nonnegative')
        op.execute('ALTER TABLE accounts ADD CONSTRAINT ck_accounts_balance_nonnegative '
                   'CHECK (may_go_negative OR balance_minor >= 0)')
    with op.batch_alter_table('accounts') as batch:
        for column in ('daily_debit_limit_minor', 'closed_at', 'frozen_until', 'frozen',
                       'overdraft_limit_minor'):
            batch.drop_column(column)
