from decimal import Decimal

from services.verify import verify_ledger


def test_a_sale_then_a_release_pays_the_payee_and_the_fee(service, engine, settings):
    service.admin_create_tokens("100.00")
    service.admin_sell_tokens_to_user("alice", "10.00")
    service.transfer_to_escrow("o-1", "alice", "bob", "5.55")
    result = service.release_from_escrow("o-1")
    assert result["payee_amount"] == "4.99" and result["fee"] == "0.56"
    assert service.balance("bob").available == Decimal("4.99")
    assert all(check.ok for check in verify_ledger(engine, settings.asset_scale))
