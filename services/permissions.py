"""What a producer may do: roles, permissions, and the plain rules that check them.

A permission is a command type's name (send commands of that type) or one of the
overrides below. A role is a named set of permissions, kept as data (tables `roles` and
`role_permissions`, seeded by migration 0004); a producer has one role and may be granted
more permissions of its own (`walletq producer create ... --allow TYPE,...`). `admin`
holds `*`: every type, registered now or later, and every override.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

__all__ = ["WEB", "PAYMENTS", "TREASURY", "ADMIN", "SYSTEM", "BUILTIN_ROLES", "EVERYTHING",
           "OVERRIDE_FEE", "PAYOUT_ANY_ACCOUNT", "OVERRIDES", "allows", "missing",
           "NOTHING_MORE"]

WEB = "web"
PAYMENTS = "payments"
TREASURY = "treasury"
ADMIN = "admin"
#: walletq itself (the expiry pass): `expire_hold` only (migration 0006 seeds it).
SYSTEM = "system"
BUILTIN_ROLES: tuple[str, ...] = (WEB, PAYMENTS, TREASURY, ADMIN, SYSTEM)

EVERYTHING = "*"
#: Name a fee rate: on a hold when it opens, or on its release (which otherwise uses the
#: rate fixed when the hold opened).
OVERRIDE_FEE = "override_fee"
#: Fund a payout from an account other than platform:treasury.
PAYOUT_ANY_ACCOUNT = "payout_any_account"
OVERRIDES: tuple[str, ...] = (OVERRIDE_FEE, PAYOUT_ANY_ACCOUNT)

NOTHING_MORE: frozenset[str] = frozenset()


def allows(granted: Collection[str], permission: str) -> bool:
    return EVERYTHING in granted or permission in granted


def missing(granted: Collection[str], needed: Iterable[str]) -> list[str]:
    """The permissions of `needed` that `granted` lacks, in order."""
    return [permission for permission in needed if not allows(granted, permission)]
