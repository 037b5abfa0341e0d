"""A producer in another language, for real: the Node.js example (examples/node-producer),
installed with `npm ci` from its committed lock file. Its commands, signed with Node's own
Ed25519 and published with celery-node to the documented queues, are applied by a real
worker; it reads their outcomes, and its conflicting replay's refusal, back by key. Its
signer reproduces walletq's test vector; ajv in strict mode (ECMA-262 regular
expressions) agrees with the worker on the schema's corpus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from services.commands import command_json_schema
from tests.e2e.conftest import BROKER_URL
from tests.support.broker import broker_idle, queue_state
from tests.support.cli import walletq
from tests.support.ledger import assert_report_sound
from tests.support.polling import eventually
from tests.unit.test_command_schema import CORPUS, LIMITS, beyond_json_schema, walletq_accepts

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "examples" / "node-producer"


@pytest.fixture(scope="session")
def node_example() -> Path:
    """examples/node-producer with its node_modules, from package-lock.json (npm ci)."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.exit(f"{' and '.join(missing)} not installed: apt-get install -y nodejs npm", returncode=3)
    done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return NODE_DIR


def test_the_node_signer_reproduces_walletqs_test_vector(node_example: Path) -> None:
    done = subprocess.run(["npm", "test"], cwd=node_example, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# fail 0" in done.stdout and "# pass 7" in done.stdout, done.stdout


def test_ajv_in_strict_mode_compiles_the_schema_and_agrees_with_the_worker(
        node_example: Path, tmp_path: Path) -> None:
    schema, commands = tmp_path / "schema.json", tmp_path / "commands.jsonl"
    schema.write_text(json.dumps(command_json_schema(LIMITS)))
    commands.write_text("".join(json.dumps(case) + "\n" for case in CORPUS))
    done = subprocess.run(["node", "tools/validate.js", str(schema), str(commands)],
                          cwd=node_example, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr  # strict mode: no unknown keyword, no bad regex
    verdicts = [line == "true" for line in done.stdout.split()]
    assert len(verdicts) == len(CORPUS)
    disagreements = [case for case, ajv_ok in zip(CORPUS, verdicts, strict=True)
                     if ajv_ok != walletq_accepts(case) and not (ajv_ok and beyond_json_schema(case))]
    assert disagreements == [], disagreements[:3]


def node(cli_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(NODE_DIR / "bin" / "walletq-node.js"), *args], env=cli_env,
                          capture_output=True, text=True, timeout=90, check=False)


def test_the_node_producers_commands_succeed_and_its_conflicting_replay_reads_as_refused(
        db_roles, worker_factory, pipeline_env, queue_prefix, node_example, tmp_path):
    """As a Node.js developer following the README: a producer created by the operator (the
    owner role), the Node CLI signing and publishing to the documented queues under a prefix,
    a real worker (the worker role) applying them, outcomes read back as the producer role."""
    worker = worker_factory(env={"WALLETQ_DATABASE_URL": db_roles["worker"]})
    key_file = tmp_path / "node-shop.pem"
    created = walletq("--json", "producer", "create", "node-shop", "--role", "treasury",
                      "--key-out", str(key_file), env={"WALLETQ_DATABASE_URL": db_roles["owner"]})
    assert created.exit_code == 0, created
    cli_env = {**os.environ, **pipeline_env, "WALLETQ_DATABASE_URL": db_roles["producer"],
               "WALLETQ_PRODUCER": "node-shop", "WALLETQ_PRODUCER_KEY_FILE": str(key_file)}
    commands = [
        {"type": "admin_create_tokens", "idempotency_key": "n-mint", "amount": "100.00"},
        {"type": "admin_sell_tokens_to_user", "idempotency_key": "n-sale", "user": "alice",
         "amount": "30.00", "memo": "Café ☕"},
        {"type": "payout_batch", "idempotency_key": "n-pay", "from_account": "platform:treasury",
         "items": [{"user": "bob", "amount": "12.00", "reference": "inv-1"},
                   {"user": "carol", "amount": "7.50", "reference": "inv-2"}]},
    ]
    for command in commands:
        sent = node(cli_env, "submit", json.dumps(command))
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["producer"] == "node-shop"
        done = node(cli_env, "status", command["idempotency_key"], "--wait", "30")
        outcome = json.loads(done.stdout)
        assert (done.returncode, outcome["status"]) == (0, "succeeded"), (outcome, worker.log_tail())
        assert outcome["refusals"] == []

    # The same key with another amount: refused without touching the first, readable by
    # its producer and key.
    replay = node(cli_env, "submit", json.dumps({**commands[0], "amount": "999.00"}))
    assert replay.returncode == 0, replay.stderr
    refused = json.loads(node(cli_env, "status", "n-mint", "--wait", "30", "--refused").stdout)
    assert refused["status"] == "succeeded"  # the first command, untouched
    assert [r["error"]["code"] for r in refused["refusals"]] == ["idempotency_conflict"], refused
    assert refused["refusals"][0]["authenticated"] is True

    readonly = {"WALLETQ_DATABASE_URL": db_roles["readonly"]}
    balances = walletq("--json", "balance", "alice", env=readonly)
    assert balances.json_lines()[0]["available"] == "30.00", balances
    # The replay's refusal is stored before its message is acknowledged: poll for the ack.
    eventually(lambda: broker_idle(BROKER_URL, queue_prefix), 30,
               describe=lambda: queue_state(BROKER_URL, queue_prefix))
    verify = walletq("--json", "verify", env=readonly)
    assert verify.exit_code == 0, verify
    assert_report_sound(verify.json())
