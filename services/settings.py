"""Settings read from the WALLETQ_* environment, in one place.

With no WALLETQ_DATABASE_URL, walletq runs embedded: a SQLite file under
WALLETQ_HOME (default ~/.walletq), so a fresh machine needs no server.

Passwords need not sit in the URLs: WALLETQ_DATABASE_PASSWORD_FILE and
WALLETQ_BROKER_PASSWORD_FILE name files (a Docker secret, a file only the process's user
may read) whose content is the password of WALLETQ_DATABASE_URL / WALLETQ_BROKER_URL. Each
process gets its own URL, naming its own database role (docs/ARCHITECTURE.md, "Database
roles"). The URLs, which then hold the passwords, are left out of the settings' repr.
With a `rediss://` broker URL the server's certificate is verified, against
WALLETQ_BROKER_CA_FILE when it is set (a private CA), else the system's CAs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["Settings", "SettingsError", "get_settings", "reset_settings", "COALESCE_MAX_LIMIT",
           "EXPIRY_BATCH_MAX_LIMIT", "SYSTEM_PRODUCER_DEFAULT"]

#: The most holds one expiry batch takes (their rows are named in one statement).
EXPIRY_BATCH_MAX_LIMIT = 10_000
#: The system producer's name when WALLETQ_SYSTEM_PRODUCER is not set.
SYSTEM_PRODUCER_DEFAULT = "walletq-system"

#: The largest coalescing bound: one transaction holds this many commands' row locks.
COALESCE_MAX_LIMIT = 1_000


class SettingsError(ValueError):
    """Raised when a WALLETQ_* variable cannot be understood: fail at start, not mid-command."""


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str = dataclasses.field(repr=False)
    broker_url: str = dataclasses.field(repr=False)
    embedded: bool
    # rediss:// (TLS): the CA that signed Redis's certificate; None = the system's CAs.
    broker_ca_file: str | None = None
    asset_code: str = "TOKEN"
    asset_scale: int = 2
    fee_rate: Decimal = Decimal("0.10")
    # Largest single amount, in minor units; keeps sums far from BIGINT's 9.2e18.
    amount_max_minor: int = 10**14
    # In-process retry of a whole transaction (deadlock, serialization, lock timeout, lost link).
    retry_attempts: int = 3
    retry_backoff_s: float = 0.1
    retry_backoff_s_max: float = 2.0
    # Every PostgreSQL connection: waits and statements are bounded.
    lock_timeout_ms: int = 5_000
    statement_timeout_ms: int = 30_000
    # Celery autoretry once in-process retries are exhausted.
    task_retries_max: int = 5
    task_backoff_s_max: int = 60
    task_time_limit_s: int = 300
    # The sweep: how often beat runs it, how old a non-terminal command must be.
    sweep_interval_s: float = 30.0
    sweep_grace_s: float = 60.0
    sweep_batch_max: int = 500
    payout_items_max: int = 10_000
    # Commands a worker applies in one transaction: the one its message names and others
    # waiting `accepted` (or a bulk producer's chunk of keys). 1: no coalescing.
    coalesce_max: int = 100
    # The statements every command runs are prepared once per PostgreSQL connection
    # (services.prepared); 0 behind a pooler in transaction mode (pgbouncer).
    prepared_statements: bool = True
    payout_chunk_items: int = 2_000  # ~0.2 s per chunk holding the funding account's lock
    # Deliveries of one command (counted in its row, across worker deaths) before it is
    # quarantined as poison: `failed` with code `poison`, its message dropped. Default:
    # WALLETQ_TASK_RETRIES_MAX + 5.
    delivery_max: int = 10
    # Test-only, refused unless WALLETQ_TEST_MODE=1: sleep this long inside each command's
    # transaction; and a fault ("exit:KEY" ends the process, "raise:KEY" raises KeyError)
    # when the command under KEY is applied (fault tests).
    test_mode: bool = False
    test_delay_s: float = 0.0
    test_fault: str | None = None
    # The producer this process signs as (WALLETQ_PRODUCER) and its private key file; with
    # neither set, an embedded deployment signs as `local-admin` (key under WALLETQ_HOME).
    producer: str | None = None
    producer_key_file: Path | None = None
    # How long a worker process trusts its copy of a producer's keys and role: a revocation
    # takes effect within this many seconds in every worker (0: read them for each command).
    producer_cache_s: float = 5.0
    # The expiry pass (services.expiry): the producer it signs `expire_hold` as (role
    # `system`; embedded: `walletq-system`, made on first use), how often beat runs it, how
    # many holds one batch takes.
    system_producer: str | None = None
    system_producer_key_file: Path | None = None
    expiry_interval_s: float = 30.0
    expiry_batch_max: int = 200

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")


_INT_FIELDS = {
    "WALLETQ_ASSET_SCALE": "asset_scale",
    "WALLETQ_RETRY_ATTEMPTS": "retry_attempts",
    "WALLETQ_LOCK_TIMEOUT_MS": "lock_timeout_ms",
    "WALLETQ_STATEMENT_TIMEOUT_MS": "statement_timeout_ms",
    "WALLETQ_TASK_RETRIES_MAX": "task_retries_max",
    "WALLETQ_TASK_BACKOFF_S_MAX": "task_backoff_s_max",
    "WALLETQ_TASK_TIME_LIMIT_S": "task_time_limit_s",
    "WALLETQ_SWEEP_BATCH_MAX": "sweep_batch_max",
    "WALLETQ_PAYOUT_ITEMS_MAX": "payout_items_max",
    "WALLETQ_PAYOUT_CHUNK_ITEMS": "payout_chunk_items",
    "WALLETQ_COALESCE_MAX": "coalesce_max",
    "WALLETQ_EXPIRY_BATCH_MAX": "expiry_batch_max",
    "WALLETQ_DELIVERY_MAX": "delivery_max",
}
_FLOAT_FIELDS = {
    "WALLETQ_RETRY_BACKOFF_S": "retry_backoff_s",
    "WALLETQ_RETRY_BACKOFF_S_MAX": "retry_backoff_s_max",
    "WALLETQ_SWEEP_INTERVAL_S": "sweep_interval_s",
    "WALLETQ_SWEEP_GRACE_S": "sweep_grace_s",
    "WALLETQ_TEST_DELAY_S": "test_delay_s",
    "WALLETQ_PRODUCER_CACHE_S": "producer_cache_s",
    "WALLETQ_EXPIRY_INTERVAL_S": "expiry_interval_s",
}


def _number(env: Mapping[str, str], name: str, kind: type) -> int | float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise SettingsError(f"{name}={raw!r} must be a finite number, not negative")
    return value


def _switch(env: Mapping[str, str], name: str, field: str) -> dict[str, bool]:
    """A 0/1 setting; unset keeps the default."""
    raw = env.get(name, "")
    if raw == "":
        return {}
    if raw not in ("0", "1"):
        raise SettingsError(f"{name}={raw[:20]!r} must be 0 or 1")
    return {field: raw == "1"}


def _fee_rate(env: Mapping[str, str]) -> Decimal | None:
    raw = env.get("WALLETQ_FEE_RATE")
    if not raw:
        return None
    try:
        rate = Decimal(raw)
    except InvalidOperation:
        raise SettingsError(f"WALLETQ_FEE_RATE={raw!r} is not a decimal") from None
    if not rate.is_finite() or not Decimal(0) <= rate <= Decimal(1):
        raise SettingsError(f"WALLETQ_FEE_RATE={raw!r} must lie between 0 and 1")
    # As a command's fee_rate: a hold stores the rate as text of at most 20 characters.
    if rate.as_tuple().exponent < -6:  # type: ignore[operator]
        raise SettingsError(f"WALLETQ_FEE_RATE={raw!r} has more than 6 decimal places")
    return rate


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    home = Path(env.get("WALLETQ_HOME") or Path.home() / ".walletq").expanduser()
    database_url = _url_with_password(env, "DATABASE")
    broker_url = _url_with_password(env, "BROKER")
    embedded = not database_url
    values: dict[str, object] = {
        "home": home,
        "database_url": database_url or f"sqlite:///{home / 'walletq.db'}",
        "broker_url": broker_url or "filesystem://",
        "embedded": embedded,
    }
    for name, field in _INT_FIELDS.items():
        number = _number(env, name, int)
        if number is not None:
            values[field] = number
    for name, field in _FLOAT_FIELDS.items():
        number = _number(env, name, float)
        if number is not None:
            values[field] = number
    ca_file = env.get("WALLETQ_BROKER_CA_FILE")
    if ca_file:
        if not Path(ca_file).is_file():
            raise SettingsError(f"WALLETQ_BROKER_CA_FILE={ca_file!r} is not a file")
        values["broker_ca_file"] = ca_file
    rate = _fee_rate(env)
    if rate is not None:
        values["fee_rate"] = rate
    values.update(_producer(env, home))
    values.update(_system_producer(env, home))
    if env.get("WALLETQ_AMOUNT_MAX"):
        values["amount_max_minor"] = _amount_max_minor(
            env["WALLETQ_AMOUNT_MAX"], int(values.get("asset_scale", 2))  # type: ignore[call-overload]
        )
    values.update(_test_switches(env, values))
    values.update(_switch(env, "WALLETQ_PREPARED_STATEMENTS", "prepared_statements"))
    values.setdefault("delivery_max", _delivery_max_default(values))
    settings = Settings(**values)  # type: ignore[arg-type]
    _check_sums(settings)
    if settings.asset_scale > 8:
        raise SettingsError("WALLETQ_ASSET_SCALE must be at most 8")
    if settings.retry_attempts < 1:
        raise SettingsError("WALLETQ_RETRY_ATTEMPTS must be at least 1")
    _check_expiry(settings)
    if not 1 <= settings.coalesce_max <= COALESCE_MAX_LIMIT:
        raise SettingsError(f"WALLETQ_COALESCE_MAX must be between 1 and {COALESCE_MAX_LIMIT}")
    return settings


#: PostgreSQL's BIGINT and SQLite's INTEGER: a balance beyond this is an overflow (SQLite
#: would silently turn it into a REAL).
INT64_MAX = 2**63 - 1
_TEST_FAULT = re.compile(r"(exit|raise):[A-Za-z0-9._:-]{1,200}")


def _delivery_max_default(values: Mapping[str, object]) -> int:
    """Each retry is a delivery: a few more deliveries than retries."""
    retries = values.get("task_retries_max", 5)
    return (retries if isinstance(retries, int) else 5) + 5


def _check_sums(settings: Settings) -> None:
    """The largest payout (items × the largest amount) must fit a signed 64-bit integer: a
    batch's total is stored as one. (A balance that many commands would push past it is
    refused by the ledger, in Python, before the database is asked.)"""
    largest = settings.amount_max_minor * max(settings.payout_items_max, 1)
    if largest > INT64_MAX:
        raise SettingsError(
            f"WALLETQ_AMOUNT_MAX × WALLETQ_PAYOUT_ITEMS_MAX is {largest} minor units, more than "
            f"a signed 64-bit integer holds ({INT64_MAX}): lower one of them")
    if settings.delivery_max <= settings.task_retries_max:
        raise SettingsError(
            f"WALLETQ_DELIVERY_MAX ({settings.delivery_max}) must exceed WALLETQ_TASK_RETRIES_MAX "
            f"({settings.task_retries_max}): each retry is a delivery")


def _test_switches(env: Mapping[str, str], values: Mapping[str, object]) -> dict[str, object]:
    """WALLETQ_TEST_* hooks exist for fault tests only: refused unless WALLETQ_TEST_MODE=1."""
    mode = env.get("WALLETQ_TEST_MODE", "")
    if mode not in ("", "0", "1"):
        raise SettingsError(f"WALLETQ_TEST_MODE={mode[:20]!r} must be 0 or 1")
    fault = env.get("WALLETQ_TEST_FAULT") or None
    hooks = [name for name, on in (("WALLETQ_TEST_DELAY_S", values.get("test_delay_s")),
                                   ("WALLETQ_TEST_FAULT", fault)) if on]
    if hooks and mode != "1":
        raise SettingsError(f"{', '.join(hooks)}: test hooks that slow or break commands; "
                            "refused unless WALLETQ_TEST_MODE=1 (never in production)")
    if fault is not None and not _TEST_FAULT.fullmatch(fault):
        raise SettingsError("WALLETQ_TEST_FAULT must be exit:KEY or raise:KEY")
    return {"test_mode": mode == "1", "test_fault": fault}


_PRODUCER_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


def _producer(env: Mapping[str, str], home: Path) -> dict[str, object]:
    """WALLETQ_PRODUCER and its key file (default: WALLETQ_HOME/producers/NAME.key)."""
    name = env.get("WALLETQ_PRODUCER") or None
    key_file = env.get("WALLETQ_PRODUCER_KEY_FILE") or None
    if name is None:
        if key_file is not None:
            raise SettingsError("WALLETQ_PRODUCER_KEY_FILE is set but WALLETQ_PRODUCER is not: "
                                "name the producer the key belongs to")
        return {}
    if not _PRODUCER_NAME.fullmatch(name):
        raise SettingsError(f"WALLETQ_PRODUCER={name[:60]!r} must be 1-200 characters of "
                            "A-Z a-z 0-9 . _ -")
    path = Path(key_file).expanduser() if key_file else home / "producers" / f"{name}.key"
    return {"producer": name, "producer_key_file": path}


def _check_expiry(settings: Settings) -> None:
    if not 1 <= settings.expiry_batch_max <= EXPIRY_BATCH_MAX_LIMIT:
        raise SettingsError(f"WALLETQ_EXPIRY_BATCH_MAX must be between 1 and {EXPIRY_BATCH_MAX_LIMIT}")


def _system_producer(env: Mapping[str, str], home: Path) -> dict[str, object]:
    """WALLETQ_SYSTEM_PRODUCER (default walletq-system) and its key file (default
    WALLETQ_HOME/producers/NAME.key): who the expiry pass signs as."""
    name = env.get("WALLETQ_SYSTEM_PRODUCER") or SYSTEM_PRODUCER_DEFAULT
    if not _PRODUCER_NAME.fullmatch(name):
        raise SettingsError(f"WALLETQ_SYSTEM_PRODUCER={name[:60]!r} must be 1-200 characters "
                            "of A-Z a-z 0-9 . _ -")
    key_file = env.get("WALLETQ_SYSTEM_PRODUCER_KEY_FILE") or None
    path = Path(key_file).expanduser() if key_file else home / "producers" / f"{name}.key"
    return {"system_producer": name, "system_producer_key_file": path}


def _password_from_file(env: Mapping[str, str], name: str) -> str | None:
    """The password in the file WALLETQ_..._PASSWORD_FILE names (one trailing newline
    dropped, as `echo` writes it), or None when the variable is unset."""
    path = env.get(name)
    if not path:
        return None
    try:
        password = Path(path).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")
    except OSError as exc:
        raise SettingsError(f"{name}={path!r} cannot be read: {exc.strerror}") from None
    if not password or "\n" in password:
        raise SettingsError(f"{name}={path!r} must hold one password on one line")
    return password


def _url_with_password(env: Mapping[str, str], kind: str) -> str:
    """WALLETQ_{kind}_URL with the password of WALLETQ_{kind}_PASSWORD_FILE put in, quoted."""
    url_name, file_name = f"WALLETQ_{kind}_URL", f"WALLETQ_{kind}_PASSWORD_FILE"
    url = env.get(url_name, "")
    password = _password_from_file(env, file_name)
    if password is None:
        return url
    if not url:
        raise SettingsError(f"{file_name} is set but {url_name} is not")
    parts = urlsplit(url)
    if parts.password is not None:
        raise SettingsError(f"{url_name} carries a password and {file_name} names another: keep one")
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def _amount_max_minor(raw: str, scale: int) -> int:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise SettingsError(f"WALLETQ_AMOUNT_MAX={raw!r} is not a decimal") from None
    if not value.is_finite() or value <= 0 or value * 10**scale > 10**17:
        raise SettingsError(f"WALLETQ_AMOUNT_MAX={raw!r} is out of range")
    minor = value.scaleb(scale)
    # Truncating would silently lower the maximum, to zero for a value below one minor unit.
    if minor != minor.to_integral_value():
        raise SettingsError(f"WALLETQ_AMOUNT_MAX={raw!r} has more than {scale} decimal places")
    return int(minor)


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, read once; tests call reset_settings() after changing the env."""
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def reset_settings() -> None:
    global _settings
    _settings = None
