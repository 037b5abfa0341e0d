"""The roles' privileges as data: every table has its line, no role may erase anything."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import pytest

from services import db_roles, schema
from services.db_roles import APPEND_ONLY, TABLE_PRIVILEGES, role_names, scram_sha_256

ROOT = Path(__file__).resolve().parents[2]


def _truncate_migration_tables() -> tuple[str, ...]:
    path = ROOT / "migrations" / "versions" / "0005_refuse_truncate.py"
    spec = importlib.util.spec_from_file_location("truncate_migration", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.APPEND_ONLY_TABLES)


def test_every_table_of_the_schema_says_who_may_touch_it() -> None:
    assert set(TABLE_PRIVILEGES) == set(schema.metadata.tables) | {"alembic_version"}


def test_no_role_may_delete_or_truncate_anything() -> None:
    granted = {p for rules in TABLE_PRIVILEGES.values() for allowed in rules.values() for p in allowed}
    assert granted <= {"SELECT", "INSERT", "UPDATE"}


def test_append_only_tables_are_inserted_and_read_only_and_refuse_truncate() -> None:
    append_only = _truncate_migration_tables()
    assert set(append_only) == {"transfers", "audit_events", "payout_items", "refusals"}
    for table in append_only:
        assert all(set(allowed) <= set(APPEND_ONLY) for allowed in TABLE_PRIVILEGES[table].values())


def test_the_producer_inserts_commands_only_and_reads_what_its_answers_need() -> None:
    producer = {table: rules["producer"] for table, rules in TABLE_PRIVILEGES.items() if "producer" in rules}
    writes = {table: allowed for table, allowed in producer.items() if allowed != ("SELECT",)}
    assert writes == {"commands": ("SELECT", "INSERT")}
    assert {"accounts", "payout_batches", "payout_items", "refusals", "producer_keys"} <= set(producer)
    assert "transfers" not in producer and "audit_events" not in producer


def test_role_names_carry_the_database_name_and_fit_postgresqls_limit() -> None:
    assert role_names("walletq") == {"owner": "walletq_owner", "worker": "walletq_worker",
                                     "producer": "walletq_producer", "readonly": "walletq_readonly"}
    assert len(role_names("d" * 54)["readonly"]) == 63
    with pytest.raises(ValueError, match="longer than 63"):
        role_names("d" * 55)


def test_a_scram_verifier_has_postgresqls_format_and_never_the_password() -> None:
    verifier = scram_sha_256("correct horse", salt=b"0123456789abcdef")
    assert verifier == scram_sha_256("correct horse", salt=b"0123456789abcdef")
    assert verifier != scram_sha_256("correct horse")  # a fresh salt each time
    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key, server_key = keys.split(":")
    assert (method, iterations) == ("SCRAM-SHA-256", "4096")
    assert base64.b64decode(salt) == b"0123456789abcdef"
    assert len(base64.b64decode(stored_key)) == len(base64.b64decode(server_key)) == 32
    assert "correct horse" not in verifier


def test_identifiers_are_quoted_whatever_they_hold() -> None:
    assert db_roles.quote_ident('we"ird') == '"we""ird"'
