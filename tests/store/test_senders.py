"""Who may send what, on both backends: sender identities and grants, DKIM keys and their
rotation, suppressed recipients, and the secrets every process on a database shares."""

from __future__ import annotations

import secrets
import string
import threading
from datetime import UTC, datetime, timedelta

import pytest

from mailsuite import dkim
from mailsuite.store import (
    Conflict,
    NotFound,
    Outbound,
    Outcome,
    Store,
    Submission,
    new_queue_id,
    open_store,
)
from tests.store.conftest import new_domain

HASH = "$2b$04$" + "x" * 53  # the store does not look inside; nobody logs in here
RSA, ED25519 = dkim.RSA_SHA256, dkim.ED25519_SHA256




def new_account(store: Store, domain: str, local: str | None = None) -> tuple[str, int]:
    address = f"{local or 'u' + secrets.token_hex(4)}@{domain}"
    return address, store.account_add(address, HASH)


def key(domain: str, algorithm: str = RSA) -> dkim.DKIMKey:
    return dkim.generate_key(domain, algorithm, bits=1024)


def add_key(store: Store, new: dkim.DKIMKey) -> None:
    store.dkim_key_add(new.domain, new.selector, new.algorithm, new.private_key)


def keys(store: Store, domain: str, active_only: bool = False) -> list[tuple[str, str, bool]]:
    return [(k.selector, k.algorithm, k.active)
            for k in store.dkim_keys(domain, active_only=active_only)]


def suppress(store: Store, address: str, reason: str = "550 5.1.1 no such user") -> None:
    """The way an address gets suppressed: a hard bounce at RCPT, recorded by delivery."""
    [queue_id] = store.submit_many([Submission(new_queue_id(), None, Outbound(
        sender="a@sender.test", recipients=(address,), raw=b"Subject: x\r\n\r\nx\r\n"))])
    assert isinstance(queue_id, str), queue_id
    now = datetime.now(UTC) + timedelta(seconds=1)
    [job] = [j for j in store.queue_claim("w", now, 100, 60) if j.queue_id == queue_id]
    store.queue_record(job, [Outcome(job.recipients[0], "bounced", reason, "mx",
                                     suppress=True)], now)


# --- sender identities and grants --------------------------------------------------------

def test_an_account_may_send_as_itself_its_direct_aliases_and_its_granted_domains(
        store: Store) -> None:
    domain = new_domain(store)
    alice, alice_id = new_account(store, domain, "alice")
    bob, _ = new_account(store, domain, "bob")
    store.alias_add(f"info@{domain}", [alice])
    store.alias_add(f"team@{domain}", [alice, bob, "outside@elsewhere.test"])
    store.alias_add(f"sales@{domain}", [f"info@{domain}"])  # to alice, but through info@
    store.alias_add(f"bobs@{domain}", [bob])
    store.alias_add(f"@{domain}", [alice])  # a catch-all: receiving, not a licence to send
    store.grant_add(alice, "Granted.TEST")

    identities = store.sender_identities(alice_id)
    assert identities.addresses == {alice, f"info@{domain}", f"team@{domain}"}
    assert identities.domains == {"granted.test"}
    for allowed in (alice, alice.upper(), f"Info@{domain.upper()}", f"team@{domain}",
                    "anyone@granted.test", "ANYONE@Granted.Test"):
        assert identities.allows(allowed), allowed
    for refused in (bob, f"bobs@{domain}", f"sales@{domain}", f"random@{domain}",
                    f"@{domain}", "anyone@sub.granted.test", "anyone@granted.test.evil",
                    "outside@elsewhere.test", ""):
        assert not identities.allows(refused), refused


def test_sender_identities_of_an_unknown_account_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.sender_identities(10**9)


def test_grants_are_added_listed_and_removed_per_account(store: Store) -> None:
    domain = new_domain(store)
    alice, alice_id = new_account(store, domain)
    bob, bob_id = new_account(store, domain)
    store.grant_add(alice, "zeta.test")
    store.grant_add(alice.upper(), "Alpha.Test.")
    store.grant_add(bob, "zeta.test")
    assert store.grant_list(alice) == ["alpha.test", "zeta.test"]
    assert store.grant_list(bob) == ["zeta.test"]
    with pytest.raises(Conflict):
        store.grant_add(alice, "ALPHA.test")

    store.grant_remove(alice, "Zeta.TEST")
    assert store.grant_list(alice) == ["alpha.test"]
    assert store.sender_identities(alice_id).domains == {"alpha.test"}
    assert store.sender_identities(bob_id).domains == {"zeta.test"}  # bob's stays
    with pytest.raises(NotFound):
        store.grant_remove(alice, "zeta.test")
    for call in (lambda: store.grant_add(f"nobody@{domain}", "x.test"),
                 lambda: store.grant_remove(f"nobody@{domain}", "x.test"),
                 lambda: store.grant_list(f"nobody@{domain}")):
        with pytest.raises(NotFound):
            call()
    assert store.grant_list(alice) == ["alpha.test"]


def test_removing_an_account_removes_its_grants(store: Store) -> None:
    domain = new_domain(store)
    alice, _ = new_account(store, domain, "alice")
    store.grant_add(alice, "granted.test")
    store.account_remove(alice)
    _, again = new_account(store, domain, "alice")
    assert store.grant_list(alice) == []
    assert store.sender_identities(again).domains == frozenset()


# --- DKIM keys ---------------------------------------------------------------------------

def test_domain_add_stores_the_keys_it_is_given_as_active(store: Store) -> None:
    rsa, ed = key("keyed.test"), key("keyed.test", ED25519)
    store.domain_add("Keyed.TEST", [(k.selector, k.algorithm, k.private_key) for k in (rsa, ed)])
    found = store.dkim_keys("keyed.test")
    assert [(k.domain, k.selector, k.algorithm, k.private_key, k.active) for k in found] == [
        ("keyed.test", rsa.selector, RSA, rsa.private_key, True),
        ("keyed.test", ed.selector, ED25519, ed.private_key, True)]
    assert keys(store, "KEYED.test.") == keys(store, "keyed.test")
    assert store.dkim_keys("keyless.test") == []
    plain = new_domain(store)
    assert store.dkim_keys(plain) == []


def test_a_new_key_signs_from_now_on_and_retires_the_previous_one_of_its_algorithm(
        store: Store) -> None:
    domain = new_domain(store)
    rsa1, ed1 = key(domain), key(domain, ED25519)
    add_key(store, rsa1)
    add_key(store, ed1)
    assert keys(store, domain) == [(rsa1.selector, RSA, True), (ed1.selector, ED25519, True)]

    rsa2 = key(domain)
    add_key(store, rsa2)
    assert keys(store, domain, active_only=True) == [(rsa2.selector, RSA, True),
                                                     (ed1.selector, ED25519, True)]
    rsa3 = key(domain)
    add_key(store, rsa3)
    listed = keys(store, domain)
    # Active keys first, RSA before Ed25519; retired ones after, newest first.
    assert listed[:2] == [(rsa3.selector, RSA, True), (ed1.selector, ED25519, True)]
    assert sorted(listed[2:]) == sorted([(rsa2.selector, RSA, False),
                                         (rsa1.selector, RSA, False)])
    assert listed.index((rsa2.selector, RSA, False)) < listed.index((rsa1.selector, RSA, False))
    # The retired keys are kept with their private keys: their records stay published a while.
    by_selector = {k.selector: k for k in store.dkim_keys(domain, active_only=False)}
    assert by_selector[rsa1.selector].private_key == rsa1.private_key


def test_keys_of_one_domain_do_not_touch_another(store: Store) -> None:
    one, two = new_domain(store), new_domain(store)
    first, second = key(one), key(two)
    add_key(store, first)
    add_key(store, second)
    add_key(store, key(one))
    assert keys(store, two) == [(second.selector, RSA, True)]
    # The same selector may be used by two domains.
    same = dkim.DKIMKey(two, first.selector, RSA, second.private_key)
    add_key(store, same)
    assert keys(store, two, active_only=True) == [(first.selector, RSA, True)]


def test_a_duplicate_selector_is_refused_and_the_active_key_stays(store: Store) -> None:
    domain = new_domain(store)
    active = key(domain)
    add_key(store, active)
    with pytest.raises(Conflict):
        store.dkim_key_add(domain, active.selector, RSA, key(domain).private_key)
    # The refusal rolled back the retirement that came with it.
    assert keys(store, domain) == [(active.selector, RSA, True)]
    with pytest.raises(NotFound):
        store.dkim_key_add("unknown.test", "sel", RSA, active.private_key)


def test_removing_a_domain_removes_its_keys(store: Store) -> None:
    domain = new_domain(store)
    add_key(store, key(domain))
    store.domain_remove(domain)
    store.domain_add(domain)
    assert keys(store, domain) == []


# --- suppressions ------------------------------------------------------------------------

def test_route_recipient_gives_the_suppression_reason_for_foreign_addresses_only(
        store: Store) -> None:
    domain = new_domain(store)
    alice, alice_id = new_account(store, domain)
    store.alias_add(f"fwd@{domain}", ["gone@remote.test"])
    suppress(store, "Gone@Remote.test", "550 5.1.1 user unknown")
    suppress(store, alice, "550 5.1.1 not really")  # a local address is never refused

    resolution, reason = store.route_recipient("gone@remote.test")
    assert (resolution.kind, reason) == ("foreign", "550 5.1.1 user unknown")
    assert store.route_recipient("GONE@REMOTE.TEST")[1] == "550 5.1.1 user unknown"
    resolution, reason = store.route_recipient("fine@remote.test")
    assert (resolution.kind, reason) == ("foreign", None)
    resolution, reason = store.route_recipient(alice)
    assert (resolution.kind, resolution.account_ids, reason) == ("local", (alice_id,), None)
    resolution, reason = store.route_recipient(f"fwd@{domain}")
    assert (resolution.kind, resolution.external, reason) == ("external",
                                                              ("gone@remote.test",), None)
    resolution, reason = store.route_recipient(f"nobody@{domain}")
    assert (resolution.kind, reason) == ("unknown", None)


def test_suppressions_are_listed_and_cleared_one_or_all(store: Store) -> None:
    for address in ("b@remote.test", "A@Remote.test", "c@remote.test"):
        suppress(store, address, f"550 {address.lower()}")
    listed = store.suppression_list()
    assert [(a, why) for a, why, _ in listed] == [
        ("a@remote.test", "550 a@remote.test"), ("b@remote.test", "550 b@remote.test"),
        ("c@remote.test", "550 c@remote.test")]
    assert all(isinstance(when, datetime) for _, _, when in listed)

    assert store.suppression_clear("A@REMOTE.test") == 1
    assert store.suppression_clear("a@remote.test") == 0
    assert store.suppression_reason("a@remote.test") is None
    assert store.route_recipient("a@remote.test")[1] is None
    assert store.suppression_reason("B@remote.test") == "550 b@remote.test"
    assert store.suppression_clear() == 2
    assert store.suppression_list() == []


# --- shared secrets ----------------------------------------------------------------------

def test_a_shared_secret_is_made_once_and_every_store_on_the_database_sees_it(
        store: Store, db_url: str) -> None:
    srs = store.shared_secret("srs")
    assert len(srs) == 64 and set(srs) <= set(string.hexdigits.lower())
    assert store.shared_secret("srs") == srs
    other = store.shared_secret("other")
    assert other != srs
    second = open_store(db_url, pool_size=1, migrate=False)
    try:
        assert second.shared_secret("srs") == srs
        assert second.shared_secret("other") == other
    finally:
        second.close()
    store.close()
    reopened = open_store(db_url, pool_size=1)
    try:
        assert reopened.shared_secret("srs") == srs
    finally:
        reopened.close()


def test_processes_asking_for_a_new_secret_at_once_all_get_the_same_one(db_url: str) -> None:
    stores = [open_store(db_url, pool_size=4, migrate=i == 0) for i in range(2)]
    try:
        results: list[str] = []
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def worker(n: int) -> None:
            try:
                start.wait()
                results.append(stores[n % 2].shared_secret("race"))
            except BaseException as exc:  # noqa: B036 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert len(results) == 8 and len(set(results)) == 1
    finally:
        for opened in stores:
            opened.close()
