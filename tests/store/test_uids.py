"""Store invariants on both backends: migrations, UIDs, shared blobs, isolation, removal."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text

from mailsuite.store import Delivered, Delivery, Store, open_store
from mailsuite.store import schema as t
from tests.store.conftest import run_together

MIGRATIONS = Path(__file__).resolve().parents[2] / "mailsuite" / "store" / "migrations"
TABLES = {"domains", "accounts", "mailboxes", "blobs", "messages", "aliases", "events"}
HASH = "$2b$04$" + "x" * 53  # the store does not look inside; tests here never log in



def head_revision() -> str:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def applied_revisions(store: Store) -> list[str]:
    with store.db.read() as conn:
        return list(conn.scalars(text("SELECT version_num FROM alembic_version")))


def table_names(store: Store) -> set[str]:
    return set(inspect(store.db.engine).get_table_names())


def new_account(store: Store, domain: str | None = None,
                local: str | None = None) -> tuple[str, int]:
    if domain is None:
        domain = f"d{secrets.token_hex(4)}.test"
        store.domain_add(domain)
    address = f"{local or 'u' + secrets.token_hex(4)}@{domain}"
    return address, store.account_add(address, HASH)


def message(tag: str) -> bytes:
    return f"Subject: {tag}\r\nMessage-ID: <{tag}@test>\r\n\r\nbody of {tag}\r\n".encode()


def mailbox_row(store: Store, account_id: int, name: str = "INBOX") -> dict:
    with store.db.read() as conn:
        row = conn.execute(select(t.mailboxes).where(
            (t.mailboxes.c.account_id == account_id) & (t.mailboxes.c.name == name))).one()
    return dict(row._mapping)


def count(store: Store, table) -> int:  # type: ignore[no-untyped-def]
    with store.db.read() as conn:
        return conn.scalar(select(func.count()).select_from(table))


# --- migrations --------------------------------------------------------------------------

def test_open_store_applies_every_migration_to_an_empty_database(db_url: str) -> None:
    bare = open_store(db_url, pool_size=1, migrate=False)
    try:
        assert not TABLES & table_names(bare)
    finally:
        bare.close()
    store = open_store(db_url, pool_size=1)
    try:
        assert table_names(store) >= TABLES
        assert applied_revisions(store) == [head_revision()]
    finally:
        store.close()


def test_opening_twice_is_idempotent_and_keeps_the_data(db_url: str) -> None:
    first = open_store(db_url, pool_size=1)
    try:
        first.domain_add("kept.test")
        address, _ = new_account(first, "kept.test")
    finally:
        first.close()
    second = open_store(db_url, pool_size=1)
    try:
        assert applied_revisions(second) == [head_revision()]
        assert second.domain_list() == [("kept.test", 1)]
        assert second.account_list() == [address]
        second.db.migrate()  # a third run on the open store changes nothing either
        assert applied_revisions(second) == [head_revision()]
    finally:
        second.close()


# --- UIDs --------------------------------------------------------------------------------

def test_uids_ascend_from_one_per_mailbox_and_uidnext_and_modseq_advance(store: Store) -> None:
    address, account = new_account(store)
    other_address, other = new_account(store)
    before = mailbox_row(store, account)
    assert (before["uidnext"], before["highestmodseq"]) == (1, 1)

    uids = [store.deliver(Delivery(message(f"m{i}"), (account,))).uids for i in range(5)]
    assert uids == [((account, i),) for i in range(1, 6)]
    after = mailbox_row(store, account)
    assert after["uidnext"] == 6
    assert after["highestmodseq"] > before["highestmodseq"]

    stored = store.messages(address)
    assert [m.uid for m in stored] == [1, 2, 3, 4, 5]
    modseqs = [m.modseq for m in stored]
    assert modseqs == sorted(set(modseqs))  # strictly ascending
    assert modseqs[0] > before["highestmodseq"]
    assert after["highestmodseq"] == modseqs[-1]
    assert [m.raw for m in stored] == [message(f"m{i}") for i in range(5)]

    # Other mailboxes and other accounts count from 1 on their own.
    sent = store.deliver(Delivery(message("sent"), (account,), mailbox="Sent"))
    assert sent.uids == ((account, 1),)
    assert [m.uid for m in store.messages(address, "Sent")] == [1]
    assert store.deliver(Delivery(message("o"), (other,))).uids == ((other, 1),)
    assert [m.uid for m in store.messages(other_address)] == [1]
    assert mailbox_row(store, account)["uidnext"] == 6  # untouched by the others
    assert mailbox_row(store, account, "Sent")["uidnext"] == 2


def test_concurrent_deliveries_from_8_threads_get_200_distinct_gapless_uids(
        store: Store) -> None:
    address, account = new_account(store)
    results: list[Delivered] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        start.wait()
        for i in range(25):
            delivered = store.deliver(Delivery(message(f"t{n}-{i}"), (account,)))
            with lock:
                results.append(delivered)

    run_together(worker, 8)
    returned = sorted(uid for d in results for _, uid in d.uids)
    assert returned == list(range(1, 201))
    stored = store.messages(address)
    assert [m.uid for m in stored] == list(range(1, 201))
    assert len({m.raw for m in stored}) == 200
    modseqs = [m.modseq for m in stored]
    assert len(set(modseqs)) == 200 and modseqs == sorted(modseqs)
    row = mailbox_row(store, account)
    assert row["uidnext"] == 201
    assert row["highestmodseq"] == max(modseqs)


# --- blobs and isolation -----------------------------------------------------------------

def test_deliver_many_to_several_accounts_stores_one_blob_shared_by_all_copies(
        store: Store) -> None:
    accounts = [new_account(store) for _ in range(3)]
    ids = tuple(account for _, account in accounts)
    blobs_before = count(store, t.blobs)
    results = store.deliver_many([
        Delivery(message("shared"), ids),
        Delivery(message("pair"), ids[:2]),
    ])
    assert all(isinstance(r, Delivered) for r in results)
    shared, pair = results
    assert isinstance(shared, Delivered) and isinstance(pair, Delivered)
    assert count(store, t.blobs) == blobs_before + 2
    assert shared.blob_id != pair.blob_id
    assert sorted(a for a, _ in shared.uids) == sorted(ids)
    for address, _ in accounts:
        copies = {m.raw: m.blob_id for m in store.messages(address)}
        assert copies[message("shared")] == shared.blob_id
    for address, _ in accounts[:2]:
        assert {m.raw: m.blob_id for m in store.messages(address)}[message("pair")] == pair.blob_id
    assert [m.raw for m in store.messages(accounts[2][0])] == [message("shared")]


def test_one_accounts_messages_never_appear_under_another_account(store: Store) -> None:
    # Same local part in two domains, and two accounts in one domain.
    one, two = f"one{secrets.token_hex(3)}.test", f"two{secrets.token_hex(3)}.test"
    store.domain_add(one)
    store.domain_add(two)
    a_address, a = new_account(store, one, "same")
    b_address, b = new_account(store, two, "same")
    c_address, c = new_account(store, one, "other")
    store.deliver_many([
        Delivery(message("for-a"), (a,)),
        Delivery(message("for-b"), (b,)),
        Delivery(message("for-c-sent"), (c,), mailbox="Sent"),
        Delivery(message("for-a-and-c"), (a, c)),
    ])
    assert [m.raw for m in store.messages(a_address)] == [message("for-a"),
                                                          message("for-a-and-c")]
    assert [m.raw for m in store.messages(b_address)] == [message("for-b")]
    assert [m.raw for m in store.messages(c_address)] == [message("for-a-and-c")]
    assert [m.raw for m in store.messages(c_address, "Sent")] == [message("for-c-sent")]
    assert store.messages(a_address, "Sent") == []
    assert store.messages(a_address.upper()) == store.messages(a_address)
    assert store.messages(f"nobody@{one}") == []


def test_account_add_creates_the_six_default_mailboxes_with_special_use(store: Store) -> None:
    _, account = new_account(store)
    with store.db.read() as conn:
        rows = conn.execute(
            select(t.mailboxes.c.name, t.mailboxes.c.special_use, t.mailboxes.c.uidnext,
                   t.mailboxes.c.highestmodseq, t.mailboxes.c.uidvalidity)
            .where(t.mailboxes.c.account_id == account).order_by(t.mailboxes.c.id)).all()
    assert [(r.name, r.special_use) for r in rows] == [
        ("INBOX", None), ("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
        ("Junk", "\\Junk"), ("Archive", "\\Archive"),
    ]
    assert all(r.uidnext == 1 for r in rows)
    assert all(0 < r.uidvalidity < 2**32 for r in rows)
    assert len({r.uidvalidity for r in rows}) == 6  # each mailbox its own
    assert set(store.subscriptions(account)) == {r.name for r in rows}


def test_removing_an_account_removes_its_mail_and_orphaned_blobs_only(store: Store) -> None:
    gone_address, gone = new_account(store)
    kept_address, kept = new_account(store)
    store.deliver(Delivery(message("alone-1"), (gone,)))
    store.deliver(Delivery(message("alone-2"), (gone,), mailbox="Archive"))
    shared = store.deliver(Delivery(message("shared"), (gone, kept)))
    blobs_before = count(store, t.blobs)
    messages_before = count(store, t.messages)

    store.account_remove(gone_address)

    assert store.account_get(gone_address) is None
    assert store.messages(gone_address) == []
    assert count(store, t.blobs) == blobs_before - 2  # the shared blob is still in use
    assert count(store, t.messages) == messages_before - 3
    with store.db.read() as conn:
        assert conn.scalar(select(func.count()).select_from(t.mailboxes)
                           .where(t.mailboxes.c.account_id == gone)) == 0
        assert conn.scalar(select(func.count()).select_from(t.events)
                           .where(t.events.c.account_id == gone)) == 0
    left = store.messages(kept_address)
    assert [(m.raw, m.blob_id) for m in left] == [(message("shared"), shared.blob_id)]

    store.account_remove(kept_address)
    assert count(store, t.blobs) == blobs_before - 3


def test_deliver_many_with_one_bad_delivery_commits_the_others(store: Store) -> None:
    a_address, a = new_account(store)
    b_address, b = new_account(store)
    blobs_before = count(store, t.blobs)
    missing = 10**9
    results = store.deliver_many([
        Delivery(message("good-a"), (a,)),
        Delivery(message("bad"), (missing,)),
        Delivery(message("good-b"), (b,)),
        Delivery(message("good-both"), (a, b)),
    ])
    assert len(results) == 4
    assert isinstance(results[1], Exception)
    for index in (0, 2, 3):
        assert isinstance(results[index], Delivered), results[index]
    assert [m.raw for m in store.messages(a_address)] == [message("good-a"),
                                                          message("good-both")]
    assert [m.raw for m in store.messages(b_address)] == [message("good-b"),
                                                          message("good-both")]
    # The failed attempts left nothing behind: no blob, no UID used.
    assert count(store, t.blobs) == blobs_before + 3
    assert [m.uid for m in store.messages(a_address)] == [1, 2]
    assert [m.uid for m in store.messages(b_address)] == [1, 2]
    assert mailbox_row(store, a)["uidnext"] == 3
