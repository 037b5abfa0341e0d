"""blocked wallets index: the few accounts that are closed or frozen, by code

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30

A payout chunk asks, of its 2,000 recipients, which wallets take no credit (closed, or
frozen for credits too): twice per chunk, once to decide and once under the credit's locks
(services.ledger.recipients_blocked). Answered from the accounts' unique index on `code`
that is 2,000 probes (~5 ms), or a scan of the whole table when the planner prefers one
(~20 ms at 100,000 wallets); a partial index of the accounts that are closed or frozen at
all holds a handful of rows, and the question costs a scan of it, whatever the chunk.
"""

from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

INDEX = 'ix_accounts_blocked_code'
BLOCKED = sa.text('closed_at IS NOT NULL OR frozen IS NOT NULL')


def upgrade() -> None:
    op.create_index(INDEX, 'accounts', ['code'], postgresql_where=BLOCKED,
                    sqlite_where=BLOCKED)


def downgrade() -> None:
    op.drop_index(INDEX, table_name='accounts')
