"""Producers as an operator manages them (`walletq producer ...`), the key each edge signs
with, the embedded deployment's own producer, and how long a worker trusts what it read."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.engine import Engine

from services import producers, schema
from services import settings as settings_module
from services.authentication import ProducerDirectory
from services.command_executor import execute_command
from services.db import get_engine
from services.errors import ForbiddenError, UnauthenticatedError
from services.producer_identity import local_admin_key_file
from services.settings import Settings, SettingsError, load_settings
from services.signing import (
    new_private_key,
    public_key_pem,
    public_key_text,
    read_private_key,
    write_private_key,
)
from services.wallet_service import WalletService
from tests.support.cli import CliResult, walletq
from tests.support.ledger import assert_ledger_sound
from tests.support.signing import signed

CREDIT = {"type": "credit_wallet", "idempotency_key": "dep-1", "user": "alice", "amount": "10.00"}


def one_json(result: CliResult) -> dict[str, Any]:
    assert result.exit_code == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout.splitlines()[0])
    return data


def producer_audit(engine: Engine) -> list[tuple[str, str]]:
    a = schema.audit_events
    with engine.connect() as conn:
        rows = conn.execute(select(a.c.outcome, a.c.detail).where(a.c.command_type == "producer")
                            .order_by(a.c.id)).all()
    return [(outcome, detail["producer"]) for outcome, detail in rows
            if not str(detail["producer"]).startswith("test-")]


def as_producer(monkeypatch: pytest.MonkeyPatch, name: str, key_file: Path) -> Settings:
    monkeypatch.setenv("WALLETQ_PRODUCER", name)
    monkeypatch.setenv("WALLETQ_PRODUCER_KEY_FILE", str(key_file))
    settings_module.reset_settings()
    return settings_module.get_settings()


def test_create_writes_a_private_key_its_owner_alone_reads_and_the_producer_signs_with_it(
        walletq_env: dict[str, str], engine: Engine, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "shop.key"
    made = one_json(walletq("--json", "producer", "create", "shop", "--role", "payments",
                            "--key-out", str(path)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert made["role"] == "payments" and made["status"] == "active"
    assert made["env"] == {"WALLETQ_PRODUCER": "shop", "WALLETQ_PRODUCER_KEY_FILE": str(path)}
    assert made["keys"][0]["public_key"] == public_key_text(read_private_key(path).public_key())
    settings = as_producer(monkeypatch, "shop", path)
    shop = WalletService(engine, settings)
    assert shop.credit_wallet("alice", "10.00", idempotency_key="dep-1")["available"] == "10.00"
    with pytest.raises(ForbiddenError):
        shop.admin_create_tokens("5.00", idempotency_key="mint-1")
    assert producer_audit(engine) == [("created", "shop")]


def test_create_refuses_a_second_producer_of_a_name_an_unknown_role_or_permission(
        walletq_env: dict[str, str], engine: Engine, tmp_path: Path) -> None:
    assert walletq("producer", "create", "shop", "--role", "web",
                   "--key-out", str(tmp_path / "a.key")).exit_code == 0
    again = walletq("--json", "producer", "create", "shop", "--role", "web",
                    "--key-out", str(tmp_path / "b.key"))
    cases = [
        (again, "exists already"),
        (walletq("--json", "producer", "create", "x", "--role", "god",
                 "--key-out", str(tmp_path / "c.key")), "no role 'god'"),
        (walletq("--json", "producer", "create", "y", "--role", "web", "--allow", "mint_money",
                 "--key-out", str(tmp_path / "d.key")), "cannot allow mint_money"),
        (walletq("--json", "producer", "create", "a:b", "--role", "web",
                 "--key-out", str(tmp_path / "e.key")), "1-200 characters"),
    ]
    for result, reason in cases:
        assert result.exit_code == 1, result.output
        error = json.loads(result.stdout)["error"]
        assert error["code"] == "invalid_producer" and reason in error["message"]
    # A refused creation leaves no key file behind, and never overwrites one.
    assert sorted(p.name for p in tmp_path.glob("*.key")) == ["a.key"]
    kept = (tmp_path / "a.key").read_bytes()
    clash = walletq("--json", "producer", "create", "z", "--role", "web",
                    "--key-out", str(tmp_path / "a.key"))
    assert clash.exit_code == 1 and "never overwritten" in clash.stdout
    assert (tmp_path / "a.key").read_bytes() == kept
    assert producer_audit(engine) == [("created", "shop")]


def test_create_exist_ok_is_a_one_shot_job_that_can_run_at_every_start(
        walletq_env: dict[str, str], engine: Engine, tmp_path: Path) -> None:
    """What a deployment's job runs each time it starts: the first run makes the producer
    and its key, later runs find them; what an operator must settle stops it."""
    path = tmp_path / "keys" / "walletq-system.key"
    path.parent.mkdir()
    job = ("--json", "producer", "create", "walletq-system", "--role", "system",
           "--key-out", str(path), "--exist-ok")
    first = one_json(walletq(*job))
    kept = path.read_bytes()
    again = one_json(walletq(*job))
    assert first["created"] is True and again["created"] is False
    assert path.read_bytes() == kept and again["keys"] == first["keys"]
    assert producer_audit(engine) == [("created", "walletq-system")]
    # Another role under the name, or a key file that is not one of its keys: refused.
    other_role = walletq(*job[:4], "--role", "admin", *job[6:])
    assert other_role.exit_code == 1 and "not active 'admin'" in other_role.stdout
    stranger = tmp_path / "keys" / "stranger.key"
    assert walletq("producer", "create", "stranger", "--role", "web",
                   "--key-out", str(stranger)).exit_code == 0
    wrong = walletq(*job[:6], "--key-out", str(stranger), "--exist-ok")
    assert wrong.exit_code == 1 and "not one of its valid keys" in wrong.stdout
    missing = walletq(*job[:6], "--key-out", str(tmp_path / "none.key"), "--exist-ok")
    assert missing.exit_code == 1 and "producer rotate walletq-system" in missing.stdout
    # A revoked producer is not brought back by the job: the operator decides.
    with engine.begin() as conn:
        producers.revoke(conn, "walletq-system")
    revoked = walletq(*job)
    assert revoked.exit_code == 1 and "exists as revoked" in revoked.stdout


def test_create_exist_ok_registers_a_kept_key_for_a_producer_the_database_lacks(
        walletq_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "kept.key"
    write_private_key(path, new_private_key())  # kept from a database since made afresh
    made = one_json(walletq("--json", "producer", "create", "walletq-system", "--role",
                            "system", "--key-out", str(path), "--exist-ok"))
    assert made["created"] is True
    assert made["keys"][0]["public_key"] == public_key_text(read_private_key(path).public_key())


def test_add_registers_a_key_made_elsewhere_and_allow_extends_the_role(
        walletq_env: dict[str, str], engine: Engine, settings: Settings, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = tmp_path / "node.pub"
    pem.write_bytes(public_key_pem(key.public_key()))
    made = one_json(walletq("--json", "producer", "add", "node-shop", "--role", "web",
                            "--public-key", str(pem), "--allow", "credit_wallet,override_fee"))
    assert made["allow"] == ["credit_wallet", "override_fee"]
    record = execute_command(signed(CREDIT, "node-shop", key=key), engine=engine,
                             settings=settings)
    assert record.status == "succeeded" and record.producer == "node-shop"
    listed = [json.loads(line) for line in walletq("--json", "producer", "list").stdout.splitlines()]
    assert {p["name"] for p in listed} >= {"node-shop", "test-admin", "test-web"}
    not_a_key = tmp_path / "bad.pub"
    not_a_key.write_text("hello")
    bad = walletq("--json", "producer", "add", "other", "--role", "web",
                  "--public-key", str(not_a_key))
    assert bad.exit_code == 1 and "PEM" in bad.stdout


def test_rotate_gives_a_new_key_and_ends_the_old_ones_revoke_ends_everything(
        walletq_env: dict[str, str], engine: Engine, settings: Settings, tmp_path: Path) -> None:
    first = tmp_path / "shop.key"
    walletq("producer", "create", "shop", "--role", "payments", "--key-out", str(first))
    rotated = one_json(walletq("--json", "producer", "rotate", "shop", "--key-out",
                               str(tmp_path / "shop-2.key")))
    new_key, old_key = rotated["keys"]
    assert old_key["valid_until"] is not None and new_key["valid_until"] is None
    assert stat.S_IMODE((tmp_path / "shop-2.key").stat().st_mode) == 0o600
    old = signed(CREDIT, "shop", key_path=first)
    with pytest.raises(UnauthenticatedError, match="not valid when the command was accepted"):
        execute_command(old, engine=engine, settings=settings)
    new = signed(CREDIT, "shop", key_path=tmp_path / "shop-2.key")
    assert execute_command(new, engine=engine, settings=settings).status == "succeeded"
    revoked = one_json(walletq("--json", "producer", "revoke", "shop"))
    assert revoked["status"] == "revoked" and all(k["revoked_at"] for k in revoked["keys"])
    assert revoked["takes_effect_within_s"] == settings.producer_cache_s
    with pytest.raises(UnauthenticatedError, match="revoked"):
        execute_command(signed({**CREDIT, "idempotency_key": "dep-2"}, "shop",
                               key_path=tmp_path / "shop-2.key"), engine=engine,
                        settings=settings)
    again = walletq("--json", "producer", "rotate", "shop", "--key-out", str(tmp_path / "3.key"))
    assert again.exit_code == 1 and "revoked" in again.stdout
    assert not (tmp_path / "3.key").exists()
    assert producer_audit(engine) == [("created", "shop"), ("rotated", "shop"),
                                      ("revoked", "shop")]
    # What the revoked producer did before stays verifiable.
    assert_ledger_sound(engine, settings)


def test_a_worker_trusts_what_it_read_of_a_producer_for_its_cache_time_only(
        engine: Engine) -> None:
    now = [1000.0]
    directory = ProducerDirectory(clock=lambda: now[0])
    assert directory.get(engine, "test-web", ttl_s=5).active  # type: ignore[union-attr]
    with engine.begin() as conn:
        producers.revoke(conn, "test-web")
    now[0] += 4.9
    assert directory.get(engine, "test-web", ttl_s=5).active  # type: ignore[union-attr]
    now[0] += 0.2
    assert not directory.get(engine, "test-web", ttl_s=5).active  # type: ignore[union-attr]
    assert directory.get(engine, "nobody", ttl_s=5) is None


# --- the key an edge signs with ----------------------------------------------------------------


def test_a_producer_without_its_key_file_or_a_key_file_without_a_producer_stops_at_start(
        tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="WALLETQ_PRODUCER is not"):
        load_settings({"WALLETQ_PRODUCER_KEY_FILE": str(tmp_path / "k.key")})
    settings = load_settings({"WALLETQ_PRODUCER": "shop", "WALLETQ_HOME": str(tmp_path)})
    assert settings.producer_key_file == tmp_path / "producers" / "shop.key"
    with pytest.raises(SettingsError, match="cannot read the key file"):
        WalletService(get_engine(settings), settings).signer  # noqa: B018


def test_a_server_deployment_with_no_producer_signs_nothing_and_says_what_to_set(
        walletq_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WALLETQ_PRODUCER")
    monkeypatch.delenv("WALLETQ_PRODUCER_KEY_FILE")
    settings_module.reset_settings()
    with pytest.raises(UnauthenticatedError, match="WALLETQ_PRODUCER"):
        WalletService().credit_wallet("alice", "1.00")
    result = walletq("--json", "submit", json.dumps(CREDIT))
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "unauthenticated"


def test_embedded_walletq_makes_its_own_admin_producer_once_and_signs_with_it(
        sqlite_env: Settings) -> None:
    engine = get_engine(sqlite_env)
    service = WalletService(engine, sqlite_env)
    service.admin_create_tokens("5.00", idempotency_key="mint-1")
    path = local_admin_key_file(sqlite_env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    WalletService(engine, sqlite_env).credit_wallet("alice", "1.00", idempotency_key="dep-1")
    with engine.connect() as conn:
        [local] = producers.list_producers(conn)
    assert (local.name, local.role, len(local.keys)) == ("local-admin", "admin", 1)
    # The key file lost (a new home, a restored database): a new key joins; the old
    # commands stay verifiable with the old one.
    path.unlink()
    WalletService(engine, sqlite_env).credit_wallet("bob", "1.00", idempotency_key="dep-2")
    with engine.connect() as conn:
        local = producers.list_producers(conn)[0]
    assert len(local.keys) == 2
    assert_ledger_sound(engine, sqlite_env)


def test_status_of_a_key_whose_commands_were_all_refused_shows_the_refusal(
        walletq_env: dict[str, str], engine: Engine, settings: Settings) -> None:
    with pytest.raises(ForbiddenError):
        execute_command(signed(CREDIT, "test-web"), engine=engine, settings=settings)
    shown = one_json(walletq("--json", "status", "dep-1"))
    assert shown["status"] == "refused" and shown["error"]["code"] == "forbidden"
    assert (shown["producer"], shown["authenticated"], shown["type"]) == (
        "test-web", True, "credit_wallet")
    listed = walletq("--json", "refusals", "dep-1", "--producer", "test-web")
    assert [json.loads(line)["error"]["code"] for line in listed.stdout.splitlines()] == [
        "forbidden"]
    assert walletq("--json", "refusals", "dep-1", "--producer", "other").stdout == ""
    human = walletq("status", "dep-1")
    assert human.exit_code == 0 and "refused" in human.stdout
    assert walletq("--json", "status", "never-sent").exit_code == 1
