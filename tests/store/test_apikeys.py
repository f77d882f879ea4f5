"""API keys in the store: only a hash is kept; revoked and expired keys find nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from mailsuite import apikeys
from mailsuite.passwords import hash_password
from mailsuite.store import NotFound, Store
from mailsuite.store import schema as t
from tests.store.conftest import new_domain


def test_a_key_is_found_by_its_secret_and_only_its_hash_is_stored(store: Store) -> None:
    key, secret = store.api_key_add("agent", ["messages:read", "admin", "admin"])
    assert key.id.startswith("key_") and key.scopes == ("admin", "messages:read")
    assert secret.startswith("ms_") and len(secret) == 3 + 43
    assert key.prefix == secret[:9]
    with store.db.read() as conn:
        stored = conn.execute(select(t.api_keys)).one()
    assert secret not in {str(value) for value in stored}
    assert stored.secret_sha256 == apikeys.secret_hash(secret)
    assert store.api_key_for_secret(secret) == key
    assert store.api_key_for_secret(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.api_key_for_secret("not a key") is None


def test_revoked_and_expired_keys_find_nothing(store: Store) -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    key, secret = store.api_key_add("short", ["messages:read"], expires_at=soon)
    assert store.api_key_for_secret(secret) == key
    assert store.api_key_for_secret(secret, now=soon + timedelta(seconds=1)) is None
    revoked = store.api_key_revoke(key.id.upper())
    assert revoked.revoked_at is not None
    assert store.api_key_for_secret(secret) is None
    with pytest.raises(NotFound):
        store.api_key_revoke(key.id)


def test_restrictions_name_existing_domains_and_inboxes(store: Store) -> None:
    domain = new_domain(store)
    address = f"bot@{domain}"
    store.account_add(address, hash_password("x" * 12, rounds=4))
    key, _ = store.api_key_add("narrow", ["inboxes:read"], domains=[domain.upper()],
                               inboxes=[address.upper()])
    assert key.domains == (domain,) and key.inboxes == (address,)
    assert store.api_key_get(key.id) == key
    with pytest.raises(NotFound):
        store.api_key_add("x", ["admin"], domains=["nowhere.test"])
    with pytest.raises(NotFound):
        store.api_key_add("x", ["admin"], inboxes=[f"ghost@{domain}"])
    with pytest.raises(ValueError, match="unknown scope"):
        store.api_key_add("x", ["root"])
    with pytest.raises(ValueError, match="at least one scope"):
        store.api_key_add("x", [])
    assert [k.id for k in store.api_key_list()] == [key.id]


def test_key_ids_sort_by_creation(store: Store) -> None:
    ids = [store.api_key_add(f"k{n}", ["admin"])[0].id for n in range(5)]
    assert [k.id for k in store.api_key_list()] == ids == sorted(ids)
