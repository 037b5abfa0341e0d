"""append-only tables refuse TRUNCATE too

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

A row trigger refuses UPDATE and DELETE on the append-only tables, but TRUNCATE fires no
row trigger: whoever may truncate (the owner, a mistaken grant) could empty the audit trail
in one statement. A statement trigger refuses it with the same function and error
(restrict_violation). SQLite has no TRUNCATE: a DELETE without WHERE meets the row trigger.
A superuser or the owner can still disable triggers; no walletq process runs as either
(services/db_roles.py).
"""

from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

APPEND_ONLY_TABLES = ('transfers', 'audit_events', 'payout_items', 'refusals')


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for table in APPEND_ONLY_TABLES:
        op.execute(
            f'CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} '
            'FOR EACH STATEMENT EXECUTE FUNCTION walletq_refuse_change()'
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for table in APPEND_ONLY_TABLES:
        op.execute(f'DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}')
