"""Migration 0006 on a database with holds in every state (PostgreSQL and SQLite): closed
holds are backfilled whole, open ones keep all they hold, and the new rules bind."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from services import settings as settings_module
from services.db import alembic_config, dispose_engines, get_engine, upgrade
from services.settings import Settings


@pytest.fixture(params=["postgresql", "sqlite"])
def at_0005(request: pytest.FixtureRequest) -> Settings:
    """A database at 0005 (PostgreSQL: the test's own, emptied back to nothing first)."""
    if request.param == "postgresql":
        request.getfixturevalue("walletq_env")
        settings = settings_module.get_settings()
        dispose_engines()
        with get_engine(settings).begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        dispose_engines()
    else:
        request.getfixturevalue("strip_env_home")
        settings = settings_module.get_settings()
    upgrade(settings, "0005")
    return settings


@pytest.fixture
def strip_env_home(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    from tests.support.env import strip_walletq_env

    strip_walletq_env(monkeypatch)
    monkeypatch.setenv("WALLETQ_HOME", str(tmp_path / "home"))
    settings_module.reset_settings()
    yield
    settings_module.reset_settings()
    dispose_engines()


def _seed(engine: Engine) -> None:
    with engine.begin() as conn:
        for n in range(1, 4):
            conn.execute(text(
                "INSERT INTO commands (id, idempotency_key, type, payload, payload_hash, status) "
                "VALUES (:n, :k, 'x', '{}', 'h', 'succeeded')"), {"n": n, "k": f"k-{n}"})
        for hold_id, status, closed_by in (("open", "held", None), ("paid", "released", 2),
                                           ("back", "refunded", 3)):
            conn.execute(text(
                "INSERT INTO holds (hold_id, payer, payee, amount_minor, status, fee_minor, "
                "fee_rate, opened_by, closed_by) VALUES (:h, 'a', 'b', 500, :s, :f, '0.10', 1, :c)"),
                {"h": hold_id, "s": status, "f": 50 if status == "released" else None,
                 "c": closed_by})


def test_closed_holds_are_backfilled_whole_and_open_ones_keep_what_they_hold(
    at_0005: Settings,
) -> None:
    engine = get_engine(at_0005)
    _seed(engine)
    upgrade(at_0005)
    with engine.connect() as conn:
        rows = {r.hold_id: (r.status, r.released_minor, r.refunded_minor, r.expires_at)
                for r in conn.execute(text("SELECT * FROM holds"))}
        roles = dict(conn.execute(text(
            "SELECT role, permission FROM role_permissions WHERE role = 'system'")).all())
    assert rows == {"open": ("held", 0, 0, None), "paid": ("released", 500, 0, None),
                    "back": ("refunded", 0, 500, None)}
    assert roles == {"system": "expire_hold"}
    with pytest.raises(IntegrityError), engine.begin() as conn:  # open iff something remains
        conn.execute(text("UPDATE holds SET released_minor = 500 WHERE hold_id = 'open'"))
    with pytest.raises(IntegrityError), engine.begin() as conn:  # never beyond the amount
        conn.execute(text("UPDATE holds SET refunded_minor = 1 WHERE hold_id = 'paid'"))
    command.downgrade(alembic_config(at_0005.database_url), "0005")
    upgrade(at_0005)
    with engine.connect() as conn:
        again = {r.hold_id: (r.status, r.released_minor, r.refunded_minor, r.expires_at)
                 for r in conn.execute(text("SELECT * FROM holds"))}
    assert again == rows
