"""holds lifecycle: partial capture, expiry, the built-in role `system`

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

A hold records what was released and refunded of it (`released_minor`, `refunded_minor`;
what remains is amount − both) and when it expires (`expires_at`, NULL: never). It is open
exactly while something remains; a closed hold is `released`, `refunded` or `expired`.
Existing closed holds are backfilled whole (a released hold released its amount, a refunded
one refunded it). The built-in role `system` may send `expire_hold` only: the expiry pass
signs as a producer of that role (services/expiry.py).

SQLite cannot alter a CHECK in place: the table is copied (batch mode, from its definition
as revision 0001 made it, plus 0004's nothing: holds did not change since).
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
OLD_STATUS = "status IN ('held', 'released', 'refunded')"
NEW_STATUS = "status IN ('held', 'released', 'refunded', 'expired')"
CHECKS = {
    'parts_non_negative': 'released_minor >= 0 AND refunded_minor >= 0',
    'parts_within_amount': 'released_minor + refunded_minor <= amount_minor',
    'open_iff_remaining': "(status = 'held') = (released_minor + refunded_minor < amount_minor)",
}
SYSTEM_ROLE = 'system'
SYSTEM_DESCRIPTION = 'walletq itself: expiring holds (the expiry pass)'
SYSTEM_PERMISSIONS = ['expire_hold']


def _holds_as_0001_made_it() -> sa.Table:
    def ck(name: str, sql: str) -> sa.CheckConstraint:
        return sa.CheckConstraint(sql, name=f'ck_holds_{name}')

    return sa.Table(
        'holds', sa.MetaData(),
        sa.Column('id', BigId, primary_key=True, autoincrement=True),
        sa.Column('hold_id', sa.String(200), nullable=False),
        sa.Column('payer', sa.String(200), nullable=False),
        sa.Column('payee', sa.String(200), nullable=False),
        sa.Column('amount_minor', sa.BigInteger(), nullable=False),
        sa.Column('status', sa.String(10), nullable=False),
        sa.Column('fee_minor', sa.BigInteger(), nullable=True),
        sa.Column('fee_rate', sa.String(20), nullable=True),
        sa.Column('opened_by', BigId, sa.ForeignKey('commands.id', name='fk_holds_opened_by_commands'),
                  nullable=False),
        sa.Column('closed_by', BigId, sa.ForeignKey('commands.id', name='fk_holds_closed_by_commands'),
                  nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(),
                  nullable=False),
        sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
        ck('closed_iff_not_held', "(status = 'held') = (closed_by IS NULL)"),
        ck('status', OLD_STATUS),
        ck('amount_positive', 'amount_minor > 0'),
        ck('fee_range', 'fee_minor IS NULL OR (fee_minor >= 0 AND fee_minor <= amount_minor)'),
        ck('distinct_users', 'payer <> payee'),
        sa.UniqueConstraint('hold_id', name='uq_holds_hold_id'),
        sa.Index('ix_holds_payer_status', 'payer', 'status'),
    )


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == 'sqlite'
    with op.batch_alter_table('holds', copy_from=_holds_as_0001_made_it() if sqlite else None,
                              recreate='always' if sqlite else 'never') as batch:
        batch.add_column(sa.Column('released_minor', sa.BigInteger(), server_default='0',
                                   nullable=False))
        batch.add_column(sa.Column('refunded_minor', sa.BigInteger(), server_default='0',
                                   nullable=False))
        batch.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint(op.f('ck_holds_status'), type_='check')
    op.execute("UPDATE holds SET released_minor = amount_minor WHERE status = 'released'")
    op.execute("UPDATE holds SET refunded_minor = amount_minor WHERE status = 'refunded'")
    with op.batch_alter_table('holds', copy_from=_with_new_columns() if sqlite else None,
                              recreate='always' if sqlite else 'never') as batch:
        batch.create_check_constraint(op.f('ck_holds_status'), NEW_STATUS)
        for name, sql in CHECKS.items():
            batch.create_check_constraint(op.f(f'ck_holds_{name}'), sql)
    op.create_index('ix_holds_status_expires_at', 'holds', ['status', 'expires_at'], unique=False)
    roles = sa.table('roles', sa.column('name', sa.String), sa.column('description', sa.String))
    permissions = sa.table('role_permissions', sa.column('role', sa.String),
                           sa.column('permission', sa.String))
    op.bulk_insert(roles, [{'name': SYSTEM_ROLE, 'description': SYSTEM_DESCRIPTION}])
    op.bulk_insert(permissions, [{'role': SYSTEM_ROLE, 'permission': p} for p in SYSTEM_PERMISSIONS])


def _with_new_columns() -> sa.Table:
    table = _holds_as_0001_made_it()
    for constraint in list(table.constraints):
        if getattr(constraint, 'name', None) == 'ck_holds_status':
            table.constraints.discard(constraint)
    table.append_column(sa.Column('released_minor', sa.BigInteger(), server_default='0',
                                  nullable=False))
    table.append_column(sa.Column('refunded_minor', sa.BigInteger(), server_default='0',
                                  nullable=False))
    table.append_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    return table


def _table_at_0006() -> sa.Table:
    table = _with_new_columns()
    table.append_constraint(sa.CheckConstraint(NEW_STATUS, name='ck_holds_status'))
    for name, sql in CHECKS.items():
        table.append_constraint(sa.CheckConstraint(sql, name=f'ck_holds_{name}'))
    return table


def downgrade() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT COUNT(*) FROM holds WHERE status = 'expired' OR "
                            "(status = 'held' AND released_minor + refunded_minor > 0)")).scalar_one():
        raise RuntimeError('holds expired or partly released cannot be represented before 0006')
    bind.execute(sa.text("DELETE FROM role_permissions WHERE role = 'system'"))
    bind.execute(sa.text("DELETE FROM roles WHERE name = 'system'"))
    op.drop_index('ix_holds_status_expires_at', table_name='holds')
    sqlite = bind.dialect.name == 'sqlite'
    with op.batch_alter_table('holds', copy_from=_table_at_0006() if sqlite else None,
                              recreate='always' if sqlite else 'never') as batch:
        for name in ('status', *CHECKS):
            batch.drop_constraint(op.f(f'ck_holds_{name}'), type_='check')
        batch.drop_column('expires_at')
        batch.drop_column('refunded_minor')
        batch.drop_column('released_minor')
        batch.create_check_constraint(op.f('ck_holds_status'), OLD_STATUS)
