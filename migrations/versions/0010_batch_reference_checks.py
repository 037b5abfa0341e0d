"""batch reference checks: audit rows' and holds' commands checked once per statement

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30

A worker writes a batch's audit rows in one INSERT and the holds it changed in one UPDATE;
their foreign keys to `commands` still checked each row on its own (a lookup and a row
lock each): ~0.9 ms of the ~1.3 ms the audit INSERT of a 100-command batch costs the
server, ~1 ms of a 100-release batch's 2 ms hold UPDATE. As migration 0008 did for
`transfers`, on PostgreSQL these foreign keys give way to statement-level triggers that look
each distinct command id up once and refuse the whole statement, with the foreign key's
SQLSTATE (23503) and name, if one is missing. A hold's UPDATE checks only the ids it
changed, as a foreign key does. Commands are never deleted nor renumbered (0008's
triggers), which is the other half of what the foreign keys guaranteed. SQLite keeps them.
"""

from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

# (table, column, constraint)
FOREIGN_KEYS = (
    ('audit_events', 'command_id', 'fk_audit_events_command_id_commands'),
    ('holds', 'opened_by', 'fk_holds_opened_by_commands'),
    ('holds', 'closed_by', 'fk_holds_closed_by_commands'),
)

# LATERAL ... LIMIT 1: an index probe per distinct id, never a join over the table. Static
# statements, so that PL/pgSQL keeps their plans for the session.
_MISSING = ("SELECT r.id INTO missing FROM ({ids}) AS r LEFT JOIN LATERAL "
            "(SELECT 1 AS hit FROM commands c WHERE c.id = r.id LIMIT 1) AS h ON true "
            "WHERE r.id IS NOT NULL AND h.hit IS NULL LIMIT 1;")
_REFUSE = """IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "{table}" violates foreign key constraint '
            '"fk_{table}_{column}_commands"' USING ERRCODE = 'foreign_key_violation',
            DETAIL = format('Key ({column})=(%s) is not present in table "commands".', missing);
    END IF;"""


def _check(table: str, column: str, ids: str) -> str:
    return _MISSING.format(ids=ids) + "\n    " + _REFUSE.format(table=table, column=column)


AUDIT_FUNCTION = f"""
CREATE OR REPLACE FUNCTION walletq_audit_references() RETURNS trigger AS $$
DECLARE
    missing BIGINT;
BEGIN
    {_check('audit_events', 'command_id', 'SELECT DISTINCT command_id AS id FROM new_rows')}
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""

# An UPDATE checks only the ids it changed (a release's closed_by), as a foreign key does.
_CHANGED = ("SELECT DISTINCT n.{column} AS id FROM new_rows n JOIN old_rows o ON o.id = n.id "
            "WHERE n.{column} IS DISTINCT FROM o.{column}")
HOLDS_FUNCTION = f"""
CREATE OR REPLACE FUNCTION walletq_holds_references() RETURNS trigger AS $$
DECLARE
    missing BIGINT;
BEGIN
    IF TG_OP = 'INSERT' THEN
        {_check('holds', 'opened_by', 'SELECT DISTINCT opened_by AS id FROM new_rows')}
        {_check('holds', 'closed_by', 'SELECT DISTINCT closed_by AS id FROM new_rows')}
    ELSE
        {_check('holds', 'opened_by', _CHANGED.format(column='opened_by'))}
        {_check('holds', 'closed_by', _CHANGED.format(column='closed_by'))}
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""

TRIGGERS = (
    # audit_events is append-only (0001): only its inserts name commands.
    ('audit_events_references', 'audit_events', 'INSERT', 'NEW TABLE AS new_rows',
     'walletq_audit_references'),
    ('holds_references_insert', 'holds', 'INSERT', 'NEW TABLE AS new_rows',
     'walletq_holds_references'),
    ('holds_references_update', 'holds', 'UPDATE', 'OLD TABLE AS old_rows NEW TABLE AS new_rows',
     'walletq_holds_references'),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(AUDIT_FUNCTION)
    op.execute(HOLDS_FUNCTION)
    # Transition tables allow one event per trigger: the holds' two share a function.
    for trigger, table, event, referencing, function in TRIGGERS:
        op.execute(f'CREATE TRIGGER {trigger} AFTER {event} ON {table} REFERENCING {referencing} '
                   f'FOR EACH STATEMENT EXECUTE FUNCTION {function}()')
    for table, _, name in FOREIGN_KEYS:
        op.drop_constraint(name, table, type_='foreignkey')


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for table, column, name in FOREIGN_KEYS:
        op.create_foreign_key(name, table, 'commands', [column], ['id'])
    for trigger, table, *_ in TRIGGERS:
        op.execute(f'DROP TRIGGER {trigger} ON {table}')
    op.execute('DROP FUNCTION walletq_audit_references()')
    op.execute('DROP FUNCTION walletq_holds_references()')
