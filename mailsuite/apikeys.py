"""API keys: their secrets, hashes, ids and scopes.

Protocol-neutral: the HTTP API checks a key on every request, and the mail protocols will take
one as a password. A secret is 32 random bytes, so a SHA-256 of it is enough to store (no
bcrypt per request) and the lookup is by that hash.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from typing import Literal, get_args

from mailsuite.ids import new_id

SECRET_PREFIX = "ms_"
#: what a key may do; "admin" covers everything
Scope = Literal["admin", "domains:read", "domains:write", "inboxes:read", "inboxes:write",
                "messages:read", "messages:send", "messages:write", "threads:read",
                "threads:write", "keys:read", "keys:write"]
SCOPES = frozenset(get_args(Scope))


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    """Enough of a secret to recognise it in a list, far too little to guess the rest."""
    return secret[:len(SECRET_PREFIX) + 6]


def new_key_id() -> str:
    return new_id("key")


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes, sorted and without repeats; ValueError names an unknown one."""
    chosen = sorted(set(scopes))
    if not chosen:
        raise ValueError("a key needs at least one scope")
    unknown = [scope for scope in chosen if scope not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r} (known: {', '.join(sorted(SCOPES))})")
    return tuple(chosen)


def grants(held: Iterable[str], needed: str) -> bool:
    """Whether scopes `held` allow `needed`: admin allows everything, x:write allows x:read."""
    held = set(held)
    if "admin" in held or needed in held:
        return True
    area, _, action = needed.partition(":")
    return action == "read" and f"{area}:write" in held


def reach_within(outer_domains: Iterable[str], outer_inboxes: Iterable[str],
                 domains: Iterable[str], inboxes: Iterable[str]) -> bool:
    """Whether a reach (domains and inboxes; both empty: everything) lies inside another."""
    outer_domains, outer_inboxes = set(outer_domains), set(outer_inboxes)
    domains, inboxes = set(domains), set(inboxes)
    if not outer_domains and not outer_inboxes:
        return True
    if not domains and not inboxes:
        return False
    return domains <= outer_domains and all(
        address in outer_inboxes or address.rpartition("@")[2] in outer_domains
        for address in inboxes)


def reaches_domain(domains: Iterable[str], inboxes: Iterable[str], name: str) -> bool:
    """Whether a key with this reach (both empty: everything) reaches domain `name`."""
    domains, inboxes = set(domains), set(inboxes)
    return (not domains and not inboxes) or name in domains


def reaches_inbox(domains: Iterable[str], inboxes: Iterable[str], address: str) -> bool:
    """Whether a key with this reach reaches the inbox `address` (or its whole domain)."""
    domains, inboxes = set(domains), set(inboxes)
    return reaches_domain(domains, inboxes, address.rpartition("@")[2]) or address in inboxes
