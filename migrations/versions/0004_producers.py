"""producers: roles, producers and their keys, signed commands, refusals

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Every command now names its producer and carries its signature; `commands` keeps what was
signed and the signature (re-verified by the worker and by `walletq verify`). Roles are
data: the four built-in roles and their permissions are seeded here, as
services.command_types.ROLE_PERMISSIONS derives them from the registry (a test holds the
two equal). `refusals` records the refusals that take no idempotency key; append-only.

Commands recorded before this revision carry no signature: the largest such id is kept in
`signature_epoch`, the only unsigned commands `walletq verify` accepts. The upgrade refuses
to run while a command is still `accepted` or `processing` (unsigned, it could never run
once signatures are required): let the workers finish first.
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')

ROLES = {
    'web': 'user-facing: transfers between users, escrow hold / release / refund, '
           'users selling tokens back',
    'payments': 'money from and to the outside: credits and debits',
    'treasury': "the platform's stock: minting, sales to users, payouts from platform:treasury",
    'admin': 'everything, and every override',
}
ROLE_PERMISSIONS = {
    'web': ['transfer_tokens_between_users', 'transfer_to_escrow', 'release_from_escrow',
            'refund_from_escrow', 'user_sell_tokens_to_admin'],
    'payments': ['credit_wallet', 'debit_wallet'],
    'treasury': ['admin_create_tokens', 'admin_sell_tokens_to_user', 'payout_batch'],
    'admin': ['*'],
}


def _ck(table: str, name: str, sql: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(sql, name=op.f(f'ck_{table}_{name}'))


def _created_at() -> sa.Column:
    return sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(),
                     nullable=False)


def _refuse_unfinished_commands() -> None:
    bind = op.get_bind()
    pending = bind.execute(sa.text(
        "SELECT COUNT(*) FROM commands WHERE status IN ('accepted', 'processing')")).scalar_one()
    if pending:
        raise RuntimeError(
            f'{pending} commands are still accepted or processing: they carry no signature and '
            'could not run after this upgrade. Let the workers finish them (walletq commands '
            '--status accepted, walletq sweep) and upgrade again.')


def upgrade() -> None:
    _refuse_unfinished_commands()
    op.add_column('commands', sa.Column('producer', sa.String(length=200), nullable=True))
    op.add_column('commands', sa.Column('signed_payload', sa.Text(), nullable=True))
    op.add_column('commands', sa.Column('signature', sa.String(length=86), nullable=True))
    if op.get_bind().dialect.name == 'postgresql':  # SQLite cannot add a constraint in place
        op.create_check_constraint(op.f('ck_commands_signed_payload_length'), 'commands',
                                   'length(signed_payload) <= 4194304')
    _producer_tables()
    op.create_table('refusals',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('producer', sa.String(length=200), nullable=True),
    sa.Column('authenticated', sa.Boolean(), nullable=False),
    sa.Column('command_type', sa.String(length=60), nullable=True),
    sa.Column('error_code', sa.String(length=40), nullable=False),
    sa.Column('error_message', sa.String(length=2000), nullable=False),
    sa.Column('source', sa.String(length=20), nullable=False),
    _created_at(),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_refusals'))
    )
    op.create_index('ix_refusals_key', 'refusals', ['idempotency_key'], unique=False)
    _append_only('refusals')
    op.create_table('signature_epoch',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('legacy_command_id_max', sa.BigInteger(), nullable=False),
    _created_at(),
    _ck('signature_epoch', 'one_row', 'id = 1'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_signature_epoch'))
    )
    op.execute('INSERT INTO signature_epoch (id, legacy_command_id_max) '
               'SELECT 1, COALESCE(MAX(id), 0) FROM commands')
    _seed_roles()


def _producer_tables() -> None:
    op.create_table('roles',
    sa.Column('name', sa.String(length=40), nullable=False),
    sa.Column('description', sa.String(length=200), nullable=False),
    _created_at(),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_roles'))
    )
    op.create_table('role_permissions',
    sa.Column('role', sa.String(length=40), nullable=False),
    sa.Column('permission', sa.String(length=60), nullable=False),
    sa.ForeignKeyConstraint(['role'], ['roles.name'], name=op.f('fk_role_permissions_role_roles')),
    sa.PrimaryKeyConstraint('role', 'permission', name=op.f('pk_role_permissions'))
    )
    op.create_table('producers',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('role', sa.String(length=40), nullable=False),
    sa.Column('status', sa.String(length=10), nullable=False),
    _created_at(),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    _ck('producers', 'status', "status IN ('active', 'revoked')"),
    _ck('producers', 'revoked_iff_time', "(status = 'revoked') = (revoked_at IS NOT NULL)"),
    _ck('producers', 'name_length', 'length(name) >= 1'),
    sa.ForeignKeyConstraint(['role'], ['roles.name'], name=op.f('fk_producers_role_roles')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_producers')),
    sa.UniqueConstraint('name', name=op.f('uq_producers_name'))
    )
    op.create_table('producer_permissions',
    sa.Column('producer_id', BigId, autoincrement=False, nullable=False),
    sa.Column('permission', sa.String(length=60), nullable=False),
    sa.ForeignKeyConstraint(['producer_id'], ['producers.id'],
                            name=op.f('fk_producer_permissions_producer_id_producers')),
    sa.PrimaryKeyConstraint('producer_id', 'permission', name=op.f('pk_producer_permissions'))
    )
    op.create_table('producer_keys',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('producer_id', BigId, nullable=False),
    sa.Column('key_id', sa.String(length=16), nullable=False),
    sa.Column('public_key', sa.String(length=43), nullable=False),
    sa.Column('valid_from', sa.DateTime(timezone=True), nullable=False),
    sa.Column('valid_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    _created_at(),
    _ck('producer_keys', 'validity_order', 'valid_until IS NULL OR valid_until >= valid_from'),
    _ck('producer_keys', 'key_length', 'length(public_key) = 43 AND length(key_id) = 16'),
    sa.ForeignKeyConstraint(['producer_id'], ['producers.id'],
                            name=op.f('fk_producer_keys_producer_id_producers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_producer_keys')),
    sa.UniqueConstraint('key_id', name=op.f('uq_producer_keys_key_id')),
    sa.UniqueConstraint('public_key', name=op.f('uq_producer_keys_public_key'))
    )
    op.create_index(op.f('ix_producer_keys_producer_id'), 'producer_keys', ['producer_id'],
                    unique=False)


def _seed_roles() -> None:
    roles = sa.table('roles', sa.column('name', sa.String), sa.column('description', sa.String))
    permissions = sa.table('role_permissions', sa.column('role', sa.String),
                           sa.column('permission', sa.String))
    op.bulk_insert(roles, [{'name': name, 'description': text} for name, text in ROLES.items()])
    op.bulk_insert(permissions, [{'role': role, 'permission': permission}
                                 for role, granted in ROLE_PERMISSIONS.items()
                                 for permission in granted])


def _append_only(table: str) -> None:
    if op.get_bind().dialect.name == 'postgresql':  # walletq_refuse_change(): migration 0001
        op.execute(f'CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} '
                   'FOR EACH ROW EXECUTE FUNCTION walletq_refuse_change()')
    else:
        for action in ('UPDATE', 'DELETE'):
            op.execute(f'CREATE TRIGGER {table}_append_only_{action.lower()} BEFORE {action} ON '
                       f"{table} BEGIN SELECT RAISE(ABORT, 'walletq: {table} is append-only'); END")


def downgrade() -> None:
    op.drop_table('signature_epoch')
    op.drop_index('ix_refusals_key', table_name='refusals')
    op.drop_table('refusals')
    op.drop_index(op.f('ix_producer_keys_producer_id'), table_name='producer_keys')
    op.drop_table('producer_keys')
    op.drop_table('producer_permissions')
    op.drop_table('producers')
    op.drop_table('role_permissions')
    op.drop_table('roles')
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_constraint(op.f('ck_commands_signed_payload_length'), 'commands', type_='check')
    op.execute('ALTER TABLE commands DROP COLUMN signature')  # SQLite >= 3.35 too
    op.execute('ALTER TABLE commands DROP COLUMN signed_payload')
    op.execute('ALTER TABLE commands DROP COLUMN producer')
