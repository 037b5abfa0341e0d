"""The registry of command types: every entry whole, and everything derived from it agrees."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Literal

import pytest

import celeryconfig
from services import command_types
from services.command_fields import Amount, CommandBase
from services.command_types import QUEUES, REGISTRY, CommandType
from services.commands import COMMAND_TYPES, CommandLimits, command_json_schema
from services.operations.base import one_transfer_of_amount
from services.operations.wallet import CreditWallet, credit_wallet
from services.permissions import ADMIN, PAYMENTS, SYSTEM, TREASURY, WEB

ROOT = Path(__file__).resolve().parents[2]


class Toy(CommandBase):
    type: Literal["toy"]
    amount: Amount


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_every_entry_has_every_part(entry: CommandType) -> None:
    literal = entry.model.model_fields["type"].annotation
    assert literal == Literal[entry.name]  # type: ignore[valid-type]
    assert (entry.handler is None) != (entry.batch_executor is None)
    runner = entry.handler or entry.batch_executor
    assert runner is not None and len(inspect.signature(runner).parameters) == 3
    assert callable(entry.implied_transfers)
    assert len(inspect.signature(entry.implied_transfers).parameters) == 1
    assert entry.queue in QUEUES
    assert isinstance(entry.roles, tuple) and set(entry.roles) <= {WEB, PAYMENTS, TREASURY, SYSTEM}
    assert callable(entry.needs) and len(inspect.signature(entry.needs).parameters) == 1
    assert (entry.footprint is None) == entry.is_batch  # a handler's rows are known first


def test_each_built_in_role_has_the_types_the_design_gives_it() -> None:
    assert command_types.ROLE_PERMISSIONS == {
        WEB: {"transfer_tokens_between_users", "transfer_to_escrow", "release_from_escrow",
              "refund_from_escrow", "user_sell_tokens_to_admin"},
        PAYMENTS: {"credit_wallet", "debit_wallet"},
        TREASURY: {"admin_create_tokens", "admin_sell_tokens_to_user", "payout_batch"},
        SYSTEM: {"expire_hold"},
        ADMIN: {"*"},
    }


def test_an_entry_naming_a_role_that_is_not_built_in_cannot_be_made() -> None:
    with pytest.raises(TypeError, match="roles"):
        CommandType("toy", Toy, one_transfer_of_amount, handler=credit_wallet, roles=("mallory",))
    with pytest.raises(TypeError, match="admin may send every type"):
        CommandType("toy", Toy, one_transfer_of_amount, handler=credit_wallet, roles=(ADMIN,))


def test_the_union_the_schema_and_the_names_come_from_the_registry() -> None:
    names = tuple(entry.name for entry in REGISTRY)
    assert COMMAND_TYPES == names
    schema = command_json_schema(CommandLimits())
    assert schema["properties"]["type"]["enum"] == list(names)
    assert [branch["if"]["properties"]["type"]["const"] for branch in schema["allOf"]] == list(names)


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_each_type_is_routed_to_its_registered_queue(entry: CommandType) -> None:
    queues = celeryconfig.QueueNames("p.")
    assert queues.for_command_type(entry.name) == f"p.{entry.queue}"


def test_an_unknown_type_travels_on_the_commands_queue_where_it_is_refused() -> None:
    assert command_types.queue_of("no_such_type") == "commands"
    assert command_types.queue_of(None) == "commands"


def test_a_handler_without_its_footprint_cannot_be_made() -> None:
    with pytest.raises(TypeError, match="footprint"):
        CommandType("toy", Toy, one_transfer_of_amount, handler=credit_wallet)


def test_an_entry_without_its_verify_rule_cannot_be_made() -> None:
    with pytest.raises(TypeError):
        CommandType("toy", Toy, handler=credit_wallet)  # type: ignore[call-arg]


def test_an_entry_with_no_way_to_run_or_two_cannot_be_made() -> None:
    with pytest.raises(TypeError, match="exactly one"):
        CommandType("toy", Toy, one_transfer_of_amount)
    with pytest.raises(TypeError, match="exactly one"):
        CommandType("toy", Toy, one_transfer_of_amount, handler=credit_wallet,
                    batch_executor=lambda engine, command, settings: None)  # type: ignore[arg-type, return-value]


def test_an_entry_whose_model_names_another_type_cannot_be_made() -> None:
    with pytest.raises(TypeError, match="CreditWallet.type"):
        CommandType("toy", CreditWallet, one_transfer_of_amount, handler=credit_wallet)


def test_an_entry_on_an_unknown_queue_cannot_be_made() -> None:
    with pytest.raises(TypeError, match="queue"):
        CommandType("toy", Toy, one_transfer_of_amount, handler=credit_wallet,
                    queue="elsewhere")  # type: ignore[arg-type]


@pytest.mark.parametrize("document", ["README.md", "docs/ARCHITECTURE.md"])
def test_every_type_is_documented(document: str) -> None:
    text = (ROOT / document).read_text()
    missing = [entry.name for entry in REGISTRY if f"`{entry.name}`" not in text]
    assert not missing, f"{document} does not document {missing}"
