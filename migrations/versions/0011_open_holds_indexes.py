"""open holds' indexes: the payer and expiry indexes hold open holds only

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30

Every question asked of `holds` by payer or by expiry is about open holds (status 'held'):
a payer's open holds (closing a wallet, the user's holds), the expiry pass's holds due,
`verify`'s escrow sums. The indexes on (payer, status) and (status, expires_at) also kept
an entry for every hold ever closed, and every release, refund or expiry that closed one
inserted two more entries. As partial indexes of the open holds they stay as small as the
holds in flight, and closing a hold writes no entry into either (PostgreSQL and SQLite).
"""

from alembic import op
import sqlalchemy as sa

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

OPEN = sa.text("status = 'held'")


def upgrade() -> None:
    op.drop_index('ix_holds_payer_status', table_name='holds')
    op.drop_index('ix_holds_status_expires_at', table_name='holds')
    op.create_index('ix_holds_open_payer', 'holds', ['payer'], postgresql_where=OPEN,
                    sqlite_where=OPEN)
    op.create_index('ix_holds_open_expires_at', 'holds', ['expires_at'], postgresql_where=OPEN,
                    sqlite_where=OPEN)


def downgrade() -> None:
    op.drop_index('ix_holds_open_expires_at', table_name='holds')
    op.drop_index('ix_holds_open_payer', table_name='holds')
    op.create_index('ix_holds_status_expires_at', 'holds', ['status', 'expires_at'])
    op.create_index('ix_holds_payer_status', 'holds', ['payer', 'status'])
