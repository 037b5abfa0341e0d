"""payout write costs: transfers' references checked once per statement; commands' length
checks that need not read the payload

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

A foreign key checks each inserted row on its own: three lookups (and row locks) per
transfer, ~18 us of a payout's ~50 us per item, 6,000 per chunk of 2,000 even though such a
chunk names one command and one debit account. On PostgreSQL the three foreign keys of
`transfers` give way to one statement-level trigger that looks each distinct referenced id
up once (an index probe each) and refuses the whole statement, with the foreign key's
SQLSTATE and wording, if one is missing.

What the foreign keys also did, the referenced rows never vanishing or changing their id,
is now said outright: accounts and commands refuse DELETE, TRUNCATE and a change of `id`
(nothing in walletq deletes either, and the worker and producer roles may not). SQLite
keeps its foreign keys.

Every UPDATE of a command row re-checked `length(payload)` and `length(signed_payload)`,
which reads and decompresses both (~6 ms for a 10,000-item payout, paid at its claim, at
every chunk's heartbeat and at its end). `octet_length` is known without reading the value
and a character is at least a byte, so `octet_length(x) <= N OR length(x) <= N` admits
exactly what `length(x) <= N` did and counts characters only for a text over N bytes.
"""

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

FOREIGN_KEYS = (
    ('fk_transfers_command_id_commands', 'command_id', 'commands'),
    ('fk_transfers_debit_account_id_accounts', 'debit_account_id', 'accounts'),
    ('fk_transfers_credit_account_id_accounts', 'credit_account_id', 'accounts'),
)
REFERENCED = ('accounts', 'commands')
LENGTH_MAX = 4194304
LENGTH_CHECKS = (('ck_commands_payload_length', 'payload'),
                 ('ck_commands_signed_payload_length', 'signed_payload'))

# LATERAL ... LIMIT 1: an index probe per distinct id, never a hash join over the table.
CHECK_FUNCTION = """
CREATE OR REPLACE FUNCTION walletq_transfers_references() RETURNS trigger AS $$
DECLARE
    missing BIGINT;
BEGIN
    SELECT r.id INTO missing FROM (SELECT DISTINCT command_id AS id FROM inserted) AS r
        LEFT JOIN LATERAL (SELECT 1 AS hit FROM commands c WHERE c.id = r.id LIMIT 1) AS h
        ON true WHERE h.hit IS NULL LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "transfers" violates foreign key '
            'constraint "fk_transfers_command_id_commands"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (command_id)=(%s) is not present in table "commands".',
                                  missing);
    END IF;
    SELECT r.id INTO missing FROM (SELECT debit_account_id AS id FROM inserted
                                   UNION SELECT credit_account_id FROM inserted) AS r
        LEFT JOIN LATERAL (SELECT 1 AS hit FROM accounts a WHERE a.id = r.id LIMIT 1) AS h
        ON true WHERE h.hit IS NULL LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "transfers" violates foreign key '
            'constraint "fk_transfers_account_accounts"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (account id)=(%s) is not present in table "accounts".',
                                  missing);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""

KEEP_FUNCTION = """
CREATE OR REPLACE FUNCTION walletq_refuse_removal() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'walletq: % rows are never removed nor renumbered (transfers name them); '
        '% refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'restrict_violation';
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(KEEP_FUNCTION)
    for table in REFERENCED:
        op.execute(f'CREATE TRIGGER {table}_kept BEFORE DELETE ON {table} '
                   'FOR EACH ROW EXECUTE FUNCTION walletq_refuse_removal()')
        op.execute(f'CREATE TRIGGER {table}_id_kept BEFORE UPDATE OF id ON {table} '
                   'FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) '
                   'EXECUTE FUNCTION walletq_refuse_removal()')
        op.execute(f'CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} '
                   'FOR EACH STATEMENT EXECUTE FUNCTION walletq_refuse_removal()')
    op.execute(CHECK_FUNCTION)
    op.execute('CREATE TRIGGER transfers_references AFTER INSERT ON transfers '
               'REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT '
               'EXECUTE FUNCTION walletq_transfers_references()')
    for name, _, _ in FOREIGN_KEYS:
        op.drop_constraint(name, 'transfers', type_='foreignkey')
    for name, column in LENGTH_CHECKS:
        _replace_check(name, f'octet_length({column}) <= {LENGTH_MAX} '
                             f'OR length({column}) <= {LENGTH_MAX}')


def _replace_check(name: str, condition: str) -> None:
    # NOT VALID then VALIDATE: the commands table is not locked against writes while its
    # rows are checked (the new condition admits exactly what the old one did).
    op.execute(f'ALTER TABLE commands DROP CONSTRAINT {name}')
    op.execute(f'ALTER TABLE commands ADD CONSTRAINT {name} CHECK ({condition}) NOT VALID')
    op.execute(f'ALTER TABLE commands VALIDATE CONSTRAINT {name}')


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for name, column in LENGTH_CHECKS:
        _replace_check(name, f'length({column}) <= {LENGTH_MAX}')
    for name, column, table in FOREIGN_KEYS:
        op.create_foreign_key(name, 'transfers', table, [column], ['id'])
    op.execute('DROP TRIGGER transfers_references ON transfers')
    op.execute('DROP FUNCTION walletq_transfers_references()')
    for table in REFERENCED:
        for trigger in ('kept', 'id_kept', 'no_truncate'):
            op.execute(f'DROP TRIGGER {table}_{trigger} ON {table}')
    op.execute('DROP FUNCTION walletq_refuse_removal()')
