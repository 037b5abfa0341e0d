"""Embedded mode (SQLite) runs partial capture and expiry: the tests of
test_holds_lifecycle, collected a second time with `settings`, `engine` and `service`
pointing at SQLite (as test_embedded_sqlite does for the operations)."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from services import expiry
from services.producer_identity import system_signer_for
from services.settings import Settings
from services.wallet_service import WalletService
from tests.integration import test_holds_lifecycle
from tests.integration.test_holds_lifecycle import expire_now
from tests.support.embedded import recollect
from tests.support.ledger import assert_ledger_sound, record

recollect(globals(), (test_holds_lifecycle,), fixtures=("funded", "system"))


def test_embedded_the_system_producer_is_made_on_first_use_and_expires_holds(
    service: WalletService, engine: Engine, settings: Settings
) -> None:
    assert engine.dialect.name == "sqlite"
    service.credit_wallet("alice", "10.00", idempotency_key="dep")
    service.transfer_to_escrow("o-1", "alice", "bob", "10.00", idempotency_key="h-1",
                               expires_in_s=60)
    service.release_from_escrow("o-1", amount="2.50", idempotency_key="r-1")
    expire_now(engine, "o-1")
    signer = system_signer_for(settings, engine)
    assert signer is not None and signer.producer == "walletq-system"
    assert (settings.home / "producers" / "walletq-system.key").exists()
    assert expiry.run_once(engine, settings, signer).expired == 1
    assert record(engine, "expire:o-1").producer == "walletq-system"
    assert service.hold("o-1")["status"] == "expired"
    assert service.balance("alice").available == 7.5
    assert_ledger_sound(engine, settings)
