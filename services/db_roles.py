"""The least-privilege database: four roles and what each may touch (PostgreSQL).

No walletq process runs as a superuser: a superuser walks past every trigger
(`SET session_replication_role = replica`), may TRUNCATE the audit trail and may write a
ledger behind walletq's back. Instead, per database (roles are cluster-wide, so their names
carry the database's: `walletq_worker` for the database `walletq`):

- **owner** owns the schema and runs the migrations (`walletq db upgrade`), producer
  management and operator repairs (`redrive`, `sweep` by hand);
- **worker** (the Celery workers) reads and writes the ledger, but may only INSERT and
  SELECT the append-only tables: no UPDATE, DELETE or TRUNCATE on them, no DELETE or
  TRUNCATE anywhere;
- **producer** (WalletClient, `walletq submit`) may INSERT and SELECT commands — a row
  policy lets it insert `accepted` commands only, never an outcome — and read balances,
  payout progress, the refusals of its commands and the producers' public keys and roles;
- **readonly** (`walletq verify`, reports, monitoring) reads everything.

`TABLE_PRIVILEGES` is the one list of who may do what; `apply_grants` makes the database
match it exactly (it revokes first), and `walletq db upgrade` runs it after migrating, so a
new table gets its grants with the migration that makes it. A table missing from the list
fails `tests/unit/test_db_roles.py`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Literal

from sqlalchemy import text
from sqlalchemy.engine import Connection

__all__ = ["RoleKind", "ROLE_KINDS", "TABLE_PRIVILEGES", "APPEND_ONLY", "role_names",
           "create_roles", "apply_grants", "roles_exist", "scram_sha_256", "quote_ident"]

RoleKind = Literal["owner", "worker", "producer", "readonly"]
ROLE_KINDS: tuple[RoleKind, ...] = ("owner", "worker", "producer", "readonly")
#: The roles granted privileges table by table (the owner owns the tables).
_GRANTEES: tuple[RoleKind, ...] = ("worker", "producer", "readonly")
_NAME_CHARS_MAX = 63  # PostgreSQL's identifier limit (NAMEDATALEN - 1)

APPEND_ONLY = ("SELECT", "INSERT")
_READ_WRITE = ("SELECT", "INSERT", "UPDATE")

#: Per table, what the worker and the producer may do; readonly may SELECT every table here.
TABLE_PRIVILEGES: dict[str, dict[RoleKind, tuple[str, ...]]] = {
    "accounts": {"worker": _READ_WRITE, "producer": ("SELECT",)},
    "commands": {"worker": _READ_WRITE, "producer": ("SELECT", "INSERT")},
    "holds": {"worker": _READ_WRITE},
    "transfers": {"worker": APPEND_ONLY},
    "audit_events": {"worker": APPEND_ONLY},
    "payout_batches": {"worker": _READ_WRITE, "producer": ("SELECT",)},
    "payout_items": {"worker": APPEND_ONLY, "producer": ("SELECT",)},
    # Producers, their public keys and roles are managed by the owner (`walletq producer
    # ...`); the worker reads them to authenticate every command, the producer client to
    # refuse at submit what the worker would refuse (nothing in them is secret).
    "roles": {"worker": ("SELECT",), "producer": ("SELECT",)},
    "role_permissions": {"worker": ("SELECT",), "producer": ("SELECT",)},
    "producers": {"worker": ("SELECT",), "producer": ("SELECT",)},
    "producer_permissions": {"worker": ("SELECT",), "producer": ("SELECT",)},
    "producer_keys": {"worker": ("SELECT",), "producer": ("SELECT",)},
    "signature_epoch": {"worker": ("SELECT",)},
    # A producer reads the refusals of its commands by key (they take no command row).
    "refusals": {"worker": APPEND_ONLY, "producer": ("SELECT",)},
    # Migration 0007: account changes and reversals, written by workers only.
    "account_events": {"worker": APPEND_ONLY},
    "reversals": {"worker": APPEND_ONLY},
    "alembic_version": {},
}

#: The producer inserts a command only as a producer would record it: accepted, untried,
#: without an outcome. Anything else (a forged `succeeded` row squatting a key) is refused.
_PRODUCER_INSERT_CHECK = ("status = 'accepted' AND attempts = 0 AND result IS NULL AND "
                          "error_code IS NULL AND error_message IS NULL AND completed_at IS NULL")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def role_names(database: str) -> dict[RoleKind, str]:
    """`{database}_owner`, `{database}_worker`, ...: unique in the cluster, as the database
    name is, and derivable by every process that knows its database."""
    names = {kind: f"{database}_{kind}" for kind in ROLE_KINDS}
    too_long = [name for name in names.values() if len(name.encode()) > _NAME_CHARS_MAX]
    if too_long:
        raise ValueError(f"role name {too_long[0]!r} is longer than {_NAME_CHARS_MAX} bytes: "
                         "use a shorter database name")
    return names


def _current_database(conn: Connection) -> str:
    return str(conn.execute(text("SELECT current_database()")).scalar_one())


def roles_exist(conn: Connection) -> bool:
    """Whether `walletq db roles` has run for this database (all four roles exist)."""
    names = list(role_names(_current_database(conn)).values())
    found = conn.execute(text("SELECT count(*) FROM pg_roles WHERE rolname = ANY(:names)"),
                         {"names": names}).scalar_one()
    return bool(found == len(names))


def create_roles(conn: Connection, passwords: Mapping[RoleKind, str] | None = None) -> list[str]:
    """Create the four roles if missing (needs a superuser, or CREATEROLE and the database's
    ownership), give the owner the schema, and apply the grants; idempotent. Passwords are
    sent as SCRAM-SHA-256 verifiers, never in clear text (server logs keep DDL). Returns the
    names of the roles created now."""
    database = _current_database(conn)
    names = role_names(database)
    created = []
    for kind, name in names.items():
        exists = conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :name"),
                              {"name": name}).first()
        if exists is None:
            conn.execute(text(f"CREATE ROLE {quote_ident(name)}"))
            created.append(name)
        # Whatever the role was before, it is now exactly this: no way around a trigger.
        conn.execute(text(f"ALTER ROLE {quote_ident(name)} WITH LOGIN NOSUPERUSER NOCREATEDB "
                          "NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"))
        if passwords and kind in passwords:
            conn.exec_driver_sql(f"ALTER ROLE {quote_ident(name)} PASSWORD %(verifier)s",
                                 {"verifier": scram_sha_256(passwords[kind])})
    _database_and_schema(conn, database, names)
    _give_to_owner(conn, names["owner"])
    apply_grants(conn)
    return created


def _database_and_schema(conn: Connection, database: str, names: Mapping[RoleKind, str]) -> None:
    """Only walletq's roles connect; only the owner creates objects. The database is
    walletq's own: nobody else's objects live in its `public` schema."""
    everyone = ", ".join(quote_ident(name) for name in names.values())
    conn.execute(text(f"REVOKE ALL ON DATABASE {quote_ident(database)} FROM PUBLIC"))
    conn.execute(text(f"GRANT CONNECT ON DATABASE {quote_ident(database)} TO {everyone}"))
    conn.execute(text("REVOKE ALL ON SCHEMA public FROM PUBLIC"))
    conn.execute(text(f"GRANT USAGE, CREATE ON SCHEMA public TO {quote_ident(names['owner'])}"))
    conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {everyone}"))


def _give_to_owner(conn: Connection, owner: str) -> None:
    """Tables (their sequences follow) and functions made before the roles existed, by
    whoever migrated then, now belong to the owner: migrations must be able to alter them."""
    tables = conn.execute(text(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') "
        "AND pg_get_userbyid(c.relowner) <> :owner"), {"owner": owner}).scalars().all()
    for table in tables:
        conn.execute(text(f"ALTER TABLE public.{quote_ident(table)} OWNER TO {quote_ident(owner)}"))
    functions = conn.execute(text(
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> :owner"),
        {"owner": owner}).scalars().all()
    for function in functions:
        conn.execute(text(f"ALTER FUNCTION {function} OWNER TO {quote_ident(owner)}"))


def apply_grants(conn: Connection) -> None:
    """Make the grants exactly TABLE_PRIVILEGES (revoke all, grant the list), sequences for
    the inserts, and the producer's row policy. Run by the owner after each migration."""
    names = role_names(_current_database(conn))
    grantees = ", ".join(quote_ident(names[kind]) for kind in _GRANTEES)
    conn.execute(text(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {grantees}"))
    conn.execute(text(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {grantees}"))
    existing = set(conn.execute(text(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    for table, privileges in TABLE_PRIVILEGES.items():
        if table not in existing:
            continue
        grants = {**privileges, "readonly": ("SELECT",)}
        for kind, allowed in grants.items():
            role = quote_ident(names[kind])
            conn.execute(text(f"GRANT {', '.join(allowed)} ON public.{quote_ident(table)} TO {role}"))
            if "INSERT" in allowed:
                for sequence in _sequences_of(conn, table):
                    conn.execute(text(f"GRANT USAGE ON SEQUENCE {sequence} TO {role}"))
    if "commands" in existing:
        _command_row_policies(conn, names)


def _sequences_of(conn: Connection, table: str) -> list[str]:
    """The sequences behind a table's serial or identity columns, as regclass text."""
    return list(conn.execute(text(
        "SELECT d.objid::regclass::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid "
        "WHERE s.relkind = 'S' AND d.refobjid = CAST(:table AS regclass) "
        "AND d.deptype IN ('a', 'i')"), {"table": f"public.{quote_ident(table)}"}).scalars())


def _command_row_policies(conn: Connection, names: Mapping[RoleKind, str]) -> None:
    """Row-level security on commands: the worker may do what its grants allow, everyone
    granted SELECT reads every row, the producer inserts accepted commands only. The owner
    (and a superuser) bypass row security; they run no command traffic."""
    worker, producer = quote_ident(names["worker"]), quote_ident(names["producer"])
    readers = ", ".join(quote_ident(names[kind]) for kind in _GRANTEES)
    policies = {
        "walletq_read": f"FOR SELECT TO {readers} USING (true)",
        "walletq_worker": f"FOR ALL TO {worker} USING (true) WITH CHECK (true)",
        "walletq_producer_accepts": f"FOR INSERT TO {producer} WITH CHECK ({_PRODUCER_INSERT_CHECK})",
    }
    conn.execute(text("ALTER TABLE public.commands ENABLE ROW LEVEL SECURITY"))
    for name, rule in policies.items():
        conn.execute(text(f"DROP POLICY IF EXISTS {name} ON public.commands"))
        conn.execute(text(f"CREATE POLICY {name} ON public.commands {rule}"))


def scram_sha_256(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for a password (RFC 5802, RFC 7677):
    `ALTER ROLE ... PASSWORD '<verifier>'` sets the password without sending it."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
