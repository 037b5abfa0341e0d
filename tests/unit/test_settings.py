"""Settings: read once from WALLETQ_*, refused at start when they make no sense."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from services.settings import SettingsError, load_settings


def test_with_nothing_set_walletq_runs_embedded_on_a_sqlite_file_under_its_home() -> None:
    settings = load_settings({"WALLETQ_HOME": "/tmp/wq-home"})
    assert settings.embedded and not settings.is_postgres
    assert settings.database_url == "sqlite:////tmp/wq-home/walletq.db"
    assert settings.broker_url == "filesystem://"
    assert settings.home == Path("/tmp/wq-home")


def test_the_defaults_are_those_of_the_design() -> None:
    settings = load_settings({})
    assert settings.home == Path.home() / ".walletq"
    assert settings.asset_code == "TOKEN" and settings.asset_scale == 2
    assert settings.fee_rate == Decimal("0.10")
    assert (settings.retry_attempts, settings.retry_backoff_s, settings.retry_backoff_s_max) == (
        3, 0.1, 2.0)
    assert settings.amount_max_minor == 10**14


def test_a_database_url_means_server_mode() -> None:
    url = "postgresql+psycopg2://postgres@127.0.0.1:5432/walletq"
    settings = load_settings({"WALLETQ_DATABASE_URL": url, "WALLETQ_BROKER_URL": "redis://x:6379"})
    assert not settings.embedded and settings.is_postgres
    assert settings.database_url == url and settings.broker_url == "redis://x:6379"


def test_numbers_are_read_from_the_environment() -> None:
    settings = load_settings({
        "WALLETQ_ASSET_SCALE": "4", "WALLETQ_FEE_RATE": "0.025", "WALLETQ_RETRY_ATTEMPTS": "7",
        "WALLETQ_RETRY_BACKOFF_S": "0.05", "WALLETQ_RETRY_BACKOFF_S_MAX": "1.5",
        "WALLETQ_SWEEP_INTERVAL_S": "10", "WALLETQ_SWEEP_GRACE_S": "20",
        "WALLETQ_LOCK_TIMEOUT_MS": "100", "WALLETQ_AMOUNT_MAX": "500.0001",
    })
    assert settings.asset_scale == 4 and settings.fee_rate == Decimal("0.025")
    assert settings.retry_attempts == 7 and settings.retry_backoff_s == 0.05
    assert settings.retry_backoff_s_max == 1.5
    assert settings.sweep_interval_s == 10.0 and settings.sweep_grace_s == 20.0
    assert settings.lock_timeout_ms == 100
    assert settings.amount_max_minor == 5_000_001


def test_an_empty_variable_counts_as_unset() -> None:
    settings = load_settings({"WALLETQ_ASSET_SCALE": "", "WALLETQ_FEE_RATE": "",
                              "WALLETQ_DATABASE_URL": ""})
    assert settings.asset_scale == 2 and settings.fee_rate == Decimal("0.10") and settings.embedded


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"WALLETQ_ASSET_SCALE": "two"}, "is not a int"),
        ({"WALLETQ_ASSET_SCALE": "2.5"}, "is not a int"),
        ({"WALLETQ_ASSET_SCALE": "-1"}, "not negative"),
        ({"WALLETQ_ASSET_SCALE": "9"}, "at most 8"),
        ({"WALLETQ_RETRY_ATTEMPTS": "0"}, "at least 1"),
        ({"WALLETQ_RETRY_BACKOFF_S": "fast"}, "is not a float"),
        ({"WALLETQ_RETRY_BACKOFF_S": "-0.1"}, "not negative"),
        ({"WALLETQ_RETRY_BACKOFF_S": "nan"}, "finite"),
        ({"WALLETQ_RETRY_BACKOFF_S_MAX": "inf"}, "finite"),
        ({"WALLETQ_SWEEP_GRACE_S": "-inf"}, "finite"),
        ({"WALLETQ_FEE_RATE": "ten percent"}, "not a decimal"),
        ({"WALLETQ_FEE_RATE": "1.5"}, "between 0 and 1"),
        ({"WALLETQ_FEE_RATE": "-0.1"}, "between 0 and 1"),
        ({"WALLETQ_FEE_RATE": "NaN"}, "between 0 and 1"),
        ({"WALLETQ_FEE_RATE": "Infinity"}, "between 0 and 1"),
        ({"WALLETQ_FEE_RATE": "0.1234567"}, "more than 6 decimal places"),
        ({"WALLETQ_FEE_RATE": "0.100000000000000000001"}, "more than 6 decimal places"),
        ({"WALLETQ_AMOUNT_MAX": "lots"}, "not a decimal"),
        ({"WALLETQ_AMOUNT_MAX": "0"}, "out of range"),
        ({"WALLETQ_AMOUNT_MAX": "-5"}, "out of range"),
        ({"WALLETQ_AMOUNT_MAX": "1e16"}, "out of range"),
        ({"WALLETQ_AMOUNT_MAX": "0.001"}, "more than 2 decimal places"),
        ({"WALLETQ_AMOUNT_MAX": "10.005"}, "more than 2 decimal places"),
    ],
)
def test_a_setting_that_makes_no_sense_is_refused_at_start_naming_the_variable(
    env: dict[str, str], reason: str
) -> None:
    with pytest.raises(SettingsError, match=reason) as caught:
        load_settings(env)
    assert next(iter(env)) in str(caught.value)


def test_settings_are_immutable() -> None:
    settings = load_settings({})
    with pytest.raises(AttributeError):
        settings.asset_scale = 3  # type: ignore[misc]


def test_the_coalescing_bound_defaults_to_100_and_stays_between_1_and_1000() -> None:
    assert load_settings({}).coalesce_max == 100
    assert load_settings({"WALLETQ_COALESCE_MAX": "1"}).coalesce_max == 1
    for bad in ("0", "1001", "x"):
        with pytest.raises(SettingsError, match="WALLETQ_COALESCE_MAX"):
            load_settings({"WALLETQ_COALESCE_MAX": bad})


def _secret(tmp_path: Path, text: str) -> str:
    path = tmp_path / "secret"
    path.write_text(text)
    return str(path)


def test_passwords_come_from_files_into_the_urls_quoted(tmp_path: Path) -> None:
    secret = _secret(tmp_path, "p@ss:w/rd#%\n")
    settings = load_settings({
        "WALLETQ_DATABASE_URL": "postgresql+psycopg2://walletq_worker@db:5432/walletq",
        "WALLETQ_DATABASE_PASSWORD_FILE": secret,
        "WALLETQ_BROKER_URL": "redis://redis:6379/0", "WALLETQ_BROKER_PASSWORD_FILE": secret,
    })
    assert settings.database_url == ("postgresql+psycopg2://walletq_worker:p%40ss%3Aw%2Frd%23%25"
                                     "@db:5432/walletq")
    assert settings.broker_url == "redis://:p%40ss%3Aw%2Frd%23%25@redis:6379/0"
    assert "p%40ss" not in repr(settings) and "p@ss" not in repr(settings)


@pytest.mark.parametrize(("env", "reason"), [
    ({"WALLETQ_DATABASE_PASSWORD_FILE": "/no/such/file",
      "WALLETQ_DATABASE_URL": "postgresql://u@h/d"}, "cannot be read"),
    ({"WALLETQ_DATABASE_PASSWORD_FILE": "{secret}"}, "WALLETQ_DATABASE_URL is not"),
    ({"WALLETQ_DATABASE_PASSWORD_FILE": "{secret}",
      "WALLETQ_DATABASE_URL": "postgresql://u:other@h/d"}, "keep one"),
    ({"WALLETQ_BROKER_PASSWORD_FILE": "{secret}",
      "WALLETQ_BROKER_URL": "redis://:other@h:6379/0"}, "keep one"),
    ({"WALLETQ_BROKER_PASSWORD_FILE": "{empty}", "WALLETQ_BROKER_URL": "redis://h"}, "one password"),
    ({"WALLETQ_BROKER_PASSWORD_FILE": "{two_lines}", "WALLETQ_BROKER_URL": "redis://h"}, "one password"),
])
def test_a_password_file_that_cannot_be_used_stops_the_process_at_start(
        tmp_path: Path, env: dict[str, str], reason: str) -> None:
    files = {"secret": "pw", "empty": "", "two_lines": "a\nb\n"}
    paths = {}
    for name, content in files.items():
        (tmp_path / name).write_text(content)
        paths[name] = str(tmp_path / name)
    env = {key: value.format(**paths) for key, value in env.items()}
    with pytest.raises(SettingsError, match=reason):
        load_settings(env)


def test_an_amount_maximum_whose_largest_payout_could_overflow_64_bits_is_refused() -> None:
    # 10^17 minor units × 10,000 items = 10^21: more than a signed 64-bit sum holds.
    with pytest.raises(SettingsError, match="signed 64-bit"):
        load_settings({"WALLETQ_AMOUNT_MAX": "1000000000000000", "WALLETQ_PAYOUT_ITEMS_MAX": "10000"})
    with pytest.raises(SettingsError, match="signed 64-bit"):
        load_settings({"WALLETQ_PAYOUT_ITEMS_MAX": "100000"})  # 10^14 × 10^5
    # At the edge: 9.2e14 minor units × 10,000 items still fits.
    fits = load_settings({"WALLETQ_AMOUNT_MAX": "9200000000000.00"})
    assert fits.amount_max_minor * fits.payout_items_max < 2**63


@pytest.mark.parametrize("hook", [{"WALLETQ_TEST_DELAY_S": "0.5"},
                                  {"WALLETQ_TEST_FAULT": "exit:k-1"}])
def test_a_test_hook_is_refused_unless_test_mode_is_explicitly_on(hook: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="WALLETQ_TEST_MODE=1"):
        load_settings(hook)
    with pytest.raises(SettingsError, match="WALLETQ_TEST_MODE=1"):
        load_settings({**hook, "WALLETQ_TEST_MODE": "0"})
    assert load_settings({**hook, "WALLETQ_TEST_MODE": "1"}).test_mode


def test_a_test_fault_must_name_its_kind_and_key() -> None:
    with pytest.raises(SettingsError, match="exit:KEY or raise:KEY"):
        load_settings({"WALLETQ_TEST_FAULT": "boom", "WALLETQ_TEST_MODE": "1"})


def test_the_delivery_limit_must_exceed_the_retries_each_of_which_is_a_delivery() -> None:
    assert load_settings({}).delivery_max == 10
    assert load_settings({"WALLETQ_TASK_RETRIES_MAX": "10"}).delivery_max == 15
    assert load_settings({"WALLETQ_DELIVERY_MAX": "3", "WALLETQ_TASK_RETRIES_MAX": "2"}
                         ).delivery_max == 3
    with pytest.raises(SettingsError, match="WALLETQ_DELIVERY_MAX"):
        load_settings({"WALLETQ_DELIVERY_MAX": "5", "WALLETQ_TASK_RETRIES_MAX": "5"})


def test_prepared_statements_are_on_unless_switched_off_with_0() -> None:
    assert load_settings({}).prepared_statements is True
    assert load_settings({"WALLETQ_PREPARED_STATEMENTS": "0"}).prepared_statements is False
    for bad in ("yes", "2", "off"):
        with pytest.raises(SettingsError, match="WALLETQ_PREPARED_STATEMENTS"):
            load_settings({"WALLETQ_PREPARED_STATEMENTS": bad})
