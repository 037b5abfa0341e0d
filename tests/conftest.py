"""Fixtures: a fresh PostgreSQL database per test (cloned from a migrated template that
holds the session's test producers), settings pointing at it (signing as `test-admin`), and
the services. Tests never depend on state left by another.

The servers are brought up (or their absence explained) by the first fixture that needs
one, so `pytest tests/unit` runs on a machine with no server at all."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from services import producers
from services import settings as settings_module
from services.db import dispose_engines, get_engine, upgrade
from services.db_roles import create_roles, quote_ident, role_names
from services.settings import Settings, load_settings
from services.signing import read_private_key
from services.wallet_service import WalletService
from tests import servers
from tests.support.env import strip_walletq_env
from tests.support.signing import ADMIN_PRODUCER, TEST_PRODUCERS, key_file, make_keys

# Hypothesis: `ci` (the default) keeps every property and state machine test within the
# suite's budget; `pytest --hypothesis-profile=long` runs them far deeper.
_PROFILE_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
hypothesis_settings.register_profile("ci", max_examples=20, stateful_step_count=30,
                                     **_PROFILE_COMMON)
hypothesis_settings.register_profile("long", max_examples=400, stateful_step_count=60,
                                     **_PROFILE_COMMON)
hypothesis_settings.load_profile("ci")


def _admin_engine() -> Engine:
    url = make_url(servers.PG_URL)
    return create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1)


def _drop(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    problem = servers.ensure_postgres()
    if problem:
        pytest.exit(problem, returncode=3)
    admin = _admin_engine()
    yield admin
    admin.dispose()


@pytest.fixture(scope="session")
def test_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's test producers' private keys (tests.support.signing)."""
    return make_keys(tmp_path_factory.mktemp("producer-keys"))


def add_test_producers(engine: Engine, keys: dict[str, Path]) -> None:
    """The test producers, each with its role and key, in a migrated database."""
    with engine.begin() as conn:
        for name, role in TEST_PRODUCERS.items():
            producers.create(conn, name, role, read_private_key(keys[name]).public_key())


@pytest.fixture(scope="session")
def pg_template(pg_admin: Engine, tmp_path_factory: pytest.TempPathFactory,
                test_keys: dict[str, Path]) -> Iterator[str]:
    """A database migrated once, holding the test producers; each test gets a copy
    (CREATE DATABASE ... TEMPLATE)."""
    name = f"walletq_tpl_{uuid.uuid4().hex[:10]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(servers.PG_URL).set(database=name).render_as_string(hide_password=False)
    env = {"WALLETQ_DATABASE_URL": url, "WALLETQ_HOME": str(tmp_path_factory.mktemp("tpl"))}
    upgrade(load_settings(env))
    template = create_engine(url, poolclass=NullPool)
    add_test_producers(template, test_keys)
    template.dispose()
    yield name
    _drop(pg_admin, name)


def pg_clone(pg_admin: Engine, template: str) -> str:
    name = f"walletq_test_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    return name


@pytest.fixture
def pg_url(pg_admin: Engine, pg_template: str) -> Iterator[str]:
    name = pg_clone(pg_admin, pg_template)
    yield make_url(servers.PG_URL).set(database=name).render_as_string(hide_password=False)
    dispose_engines()
    _drop(pg_admin, name)


@pytest.fixture
def walletq_env(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The WALLETQ_* environment of a test: its own database, fast in-process retries, and
    the producer `test-admin` (role admin) signing what the edges submit."""
    strip_walletq_env(monkeypatch)
    env = {
        "WALLETQ_DATABASE_URL": pg_url,
        "WALLETQ_HOME": str(tmp_path / "home"),
        "WALLETQ_RETRY_BACKOFF_S": "0.02",
        "WALLETQ_RETRY_BACKOFF_S_MAX": "0.2",
        "WALLETQ_PRODUCER": ADMIN_PRODUCER,
        "WALLETQ_PRODUCER_KEY_FILE": str(key_file(ADMIN_PRODUCER)),
        # The fault tests' hooks (WALLETQ_TEST_DELAY_S, WALLETQ_TEST_FAULT) need it.
        "WALLETQ_TEST_MODE": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings_module.reset_settings()
    yield env
    settings_module.reset_settings()
    dispose_engines()


@pytest.fixture
def settings(walletq_env: dict[str, str]) -> Settings:
    return settings_module.get_settings()


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return get_engine(settings)


@pytest.fixture
def service(settings: Settings, engine: Engine) -> WalletService:
    return WalletService(engine, settings)


@pytest.fixture
def sqlite_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Embedded mode: no WALLETQ_DATABASE_URL, a SQLite file under a temporary home."""
    strip_walletq_env(monkeypatch)
    monkeypatch.setenv("WALLETQ_HOME", str(tmp_path / "home"))
    settings_module.reset_settings()
    settings = settings_module.get_settings()
    upgrade(settings)
    yield settings
    settings_module.reset_settings()
    dispose_engines()


@pytest.fixture
def db_roles(walletq_env: dict[str, str], pg_admin: Engine) -> Iterator[dict[str, str]]:
    """walletq's four roles for the test's database, made as `walletq db roles` makes them
    (by a superuser), as URLs that log in as each: {"owner": url, "worker": url, ...}.
    Roles are cluster-wide: their names carry the test's random database name, and they
    are dropped after the test."""
    url = make_url(walletq_env["WALLETQ_DATABASE_URL"])
    names = role_names(str(url.database))
    superuser = create_engine(url, poolclass=NullPool)
    try:
        with superuser.begin() as conn:
            create_roles(conn)
        yield {kind: url.set(username=name).render_as_string(hide_password=False)
               for kind, name in names.items()}
    finally:
        dispose_engines()
        drop_roles(superuser, pg_admin, list(names.values()))
        superuser.dispose()


def drop_roles(in_database: Engine, admin: Engine, names: list[str]) -> None:
    """End the roles' sessions, drop what they own or were granted in the database, then
    the roles themselves."""
    quoted = ", ".join(quote_ident(name) for name in names)
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE usename = ANY(:names)"), {"names": names})
    with in_database.begin() as conn:
        conn.execute(text(f"DROP OWNED BY {quoted}"))
    with admin.connect() as conn:
        conn.execute(text(f"DROP ROLE IF EXISTS {quoted}"))
