"""The outbound queue on both backends: submissions committed with their local copies, claims
with leases, outcomes, bounces routed in the same transaction, and the operator's commands."""

from __future__ import annotations

import secrets
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from mailsuite.store import (
    Delivery,
    Job,
    Outbound,
    Outcome,
    Settlement,
    Store,
    Submission,
    new_queue_id,
    open_store,
)
from mailsuite.store import schema as t
from tests.store.conftest import new_domain, run_together

HASH = "$2b$04$" + "x" * 53  # the store does not look inside; nobody logs in here
LEASE = 300.0




def new_account(store: Store, domain: str | None = None) -> tuple[str, int]:
    address = f"u{secrets.token_hex(4)}@{domain or new_domain(store)}"
    return address, store.account_add(address, HASH)


def message(tag: str, extra: bytes = b"") -> bytes:
    return (f"From: a@sender.test\r\nSubject: {tag}\r\nMessage-ID: <{tag}@test>\r\n\r\n"
            f"body of {tag}\r\n").encode() + extra


def outbound(recipients: tuple[str, ...], tag: str = "out", *, sender: str = "a@sender.test",
             return_to: str = "", account_id: int | None = None, raw: bytes | None = None,
             ) -> Outbound:
    return Outbound(sender=sender, recipients=recipients, raw=raw or message(tag),
                    return_to=return_to, account_id=account_id, detail={"via": "test"})


def queue(store: Store, ob: Outbound, delivery: Delivery | None = None) -> str:
    queue_id = new_queue_id()
    [result] = store.submit_many([Submission(queue_id, delivery, ob)])
    assert result == queue_id, result
    return queue_id


def soon() -> datetime:
    """A moment just after everything submitted so far (submissions are due at once)."""
    return datetime.now(UTC) + timedelta(seconds=1)


def claim_one_job(store: Store, now: datetime, holder: str = "worker/1") -> Job:
    [job] = store.queue_claim(holder, now, 100, LEASE)
    return job


def claims(store: Store) -> dict[str, tuple[str | None, datetime | None]]:
    """recipient -> (claimed_by, claimed_until), straight from the table."""
    r = t.outbound_recipients
    with store.db.read() as conn:
        rows = conn.execute(select(r.c.recipient, r.c.claimed_by, r.c.claimed_until)).all()
    return {row.recipient: (row.claimed_by, row.claimed_until and _utc(row.claimed_until))
            for row in rows}


def recipients_of(store: Store, queue_id: str) -> dict[str, tuple]:
    """recipient -> (state, attempts, next attempt, last reply) as queue_list shows them."""
    entries = store.queue_list(queue_id)
    if not entries:
        return {}
    [entry] = entries
    return {rcpt: tuple(rest) for rcpt, *rest in entry.recipients}


def events(store: Store, kind: str, queue_id: str | None = None) -> list[dict]:
    found = [e.detail for e in store.events(kind, limit=10_000)]
    return [d for d in found if queue_id is None or d.get("queue_id") == queue_id]


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# --- submitting --------------------------------------------------------------------------

def test_submit_commits_the_local_copy_and_the_queued_recipients_together(store: Store) -> None:
    domain = new_domain(store)
    alice, alice_id = new_account(store, domain)
    bob, bob_id = new_account(store, domain)
    raw = message("mixed", "8bit: caf\u00e9\r\n".encode())
    ob = outbound(("carol@remote.test", "Dave@Remote.TEST", "carol@remote.test"),
                  raw=raw, sender=alice, return_to=alice, account_id=alice_id)
    mixed, remote_only, local_only = new_queue_id(), new_queue_id(), new_queue_id()
    before = datetime.now(UTC)

    results = store.submit_many([
        Submission(mixed, Delivery(raw, (bob_id,)), ob),
        Submission(remote_only, None, outbound(("erin@other.test",), "remote-only")),
        Submission(local_only, Delivery(message("local-only"), (alice_id,)), None),
    ])

    assert results == [mixed, remote_only, local_only]
    assert [m.raw for m in store.messages(bob)] == [raw]
    assert [m.raw for m in store.messages(alice)] == [message("local-only")]
    entries = {e.queue_id: e for e in store.queue_list()}
    assert set(entries) == {mixed, remote_only}  # a local-only message is not queued
    entry = entries[mixed]
    assert (entry.kind, entry.sender, entry.size) == ("submission", alice, len(raw))
    assert before - timedelta(seconds=1) <= entry.created_at <= datetime.now(UTC)
    # Each recipient once, in order, queued and due at once.
    assert [(rcpt, state, attempts, reply) for rcpt, state, attempts, _, reply
            in entry.recipients] == [("carol@remote.test", "queued", 0, None),
                                     ("Dave@Remote.TEST", "queued", 0, None)]
    assert all(next_at == entry.created_at for _, _, _, next_at, _ in entry.recipients)
    assert store.queue_message(mixed) == raw
    assert store.queue_message(mixed.lower()) == raw
    assert store.queue_size() == 3

    [queued] = events(store, "queued", mixed)
    assert queued["sender"] == alice and queued["kind"] == "submission"
    assert queued["via"] == "test"  # the submission's own detail is kept
    assert queued["recipients"] == list(ob.recipients)
    [received] = [e for e in store.events("received") if e.account_id == bob_id]
    assert received.detail["mailbox"] == "INBOX"

    job = next(j for j in store.queue_claim("w", soon(), 10, LEASE) if j.queue_id == mixed)
    assert (job.sender, job.return_to, job.account_id, job.kind) == (
        alice, alice, alice_id, "submission")
    assert job.eightbit and not job.smtputf8 and job.size == len(raw)
    # The domain is kept lower-cased for grouping; the address as it was given.
    assert [(r.recipient, r.domain, r.attempts) for r in job.recipients] == [
        ("carol@remote.test", "remote.test", 0), ("Dave@Remote.TEST", "remote.test", 0)]
    assert store.queue_data(job.outbound_id) == raw


def test_one_failing_submission_in_a_batch_does_not_cost_the_others(store: Store) -> None:
    domain = new_domain(store)
    alice, alice_id = new_account(store, domain)
    existing = queue(store, outbound(("x@remote.test",), "existing"))
    good, bad, good_too, duplicate = (new_queue_id() for _ in range(4))

    results = store.submit_many([
        Submission(good, Delivery(message("good"), (alice_id,)),
                   outbound(("one@remote.test",), "good")),
        Submission(bad, Delivery(message("bad"), (10**9,)),  # no such account
                   outbound(("two@remote.test",), "bad")),
        Submission(good_too, None, outbound(("three@remote.test",), "good-too")),
        # A queue id taken already: refused, and its local copy with it.
        Submission(existing, Delivery(message("dup"), (alice_id,)),
                   outbound(("four@remote.test",), "dup")),
        Submission(duplicate, None, outbound(("five@remote.test",), "after")),
    ])

    assert len(results) == 5
    assert results[0] == good and results[2] == good_too and results[4] == duplicate
    assert isinstance(results[1], Exception) and isinstance(results[3], Exception)
    assert [m.raw for m in store.messages(alice)] == [message("good")]
    queued = {e.queue_id: [r[0] for r in e.recipients] for e in store.queue_list()}
    assert queued == {existing: ["x@remote.test"], good: ["one@remote.test"],
                      good_too: ["three@remote.test"], duplicate: ["five@remote.test"]}
    assert store.queue_message(bad) is None
    assert store.queue_message(existing) == message("existing")
    assert {e["queue_id"] for e in events(store, "queued")} == {existing, good, good_too,
                                                                duplicate}


# --- claiming ----------------------------------------------------------------------------

def test_claim_returns_due_recipients_grouped_by_message_and_not_future_ones(
        store: Store) -> None:
    first = queue(store, outbound(("a1@one.test", "a2@two.test", "a3@one.test"), "first"))
    second = queue(store, outbound(("b1@one.test",), "second"))
    now = soon()
    # Before the messages were submitted nothing is due.
    assert store.queue_claim("early", now - timedelta(minutes=5), 10, LEASE) == []

    jobs = store.queue_claim("w1", now, 10, LEASE)
    assert [(j.queue_id, [r.recipient for r in j.recipients]) for j in jobs] == [
        (first, ["a1@one.test", "a2@two.test", "a3@one.test"]), (second, ["b1@one.test"])]
    assert jobs[0].outbound_id != jobs[1].outbound_id
    job_first, job_second = jobs

    # Defer them to different moments; nothing is due before the earliest.
    a1, a2, a3 = job_first.recipients
    store.queue_record(job_first, [
        Outcome(a1, "deferred", "451 4.2.0 later", "mx.one.test", now + timedelta(hours=1)),
        Outcome(a2, "deferred", "451 4.2.0 later", "mx.two.test", now + timedelta(minutes=10)),
        Outcome(a3, "deferred", "451 4.2.0 later", "mx.one.test", now + timedelta(hours=1)),
    ], now)
    [b1] = job_second.recipients
    store.queue_record(job_second, [
        Outcome(b1, "deferred", "421 4.4.2 gone", "", now + timedelta(minutes=10))], now)

    assert store.queue_claim("w2", now + timedelta(minutes=9), 10, LEASE) == []
    at_ten = store.queue_claim("w2", now + timedelta(minutes=10), 10, LEASE)
    assert [(j.queue_id, [(r.recipient, r.attempts) for r in j.recipients]) for j in at_ten] == [
        (first, [("a2@two.test", 1)]), (second, [("b1@one.test", 1)])]
    for job in at_ten:
        store.queue_record(job, [Outcome(r, "delivered", "250 ok", "mx") for r in job.recipients],
                           now + timedelta(minutes=10))
    assert store.queue_claim("w3", now + timedelta(minutes=59), 10, LEASE) == []
    at_hour = store.queue_claim("w3", now + timedelta(hours=1), 10, LEASE)
    assert [(j.queue_id, [r.recipient for r in j.recipients]) for j in at_hour] == [
        (first, ["a1@one.test", "a3@one.test"])]


def test_claim_takes_at_most_limit_recipients_the_longest_due_first(store: Store) -> None:
    ids = [queue(store, outbound((f"r{i}@remote.test",), f"m{i}")) for i in range(5)]
    now = soon()
    taken: list[str] = []
    for holder in ("w1", "w2", "w3"):
        jobs = store.queue_claim(holder, now, 2, LEASE)
        assert sum(len(j.recipients) for j in jobs) == len(jobs) <= 2
        taken += [j.queue_id for j in jobs]
    assert taken == ids  # submitted together or not, in order, none twice


def test_a_claimed_recipient_is_not_claimed_again_until_its_lease_runs_out(
        store: Store) -> None:
    queue_id = queue(store, outbound(("one@remote.test", "two@remote.test"), "leased"))
    now = soon()
    first = store.queue_claim("host-a/1/x", now, 10, LEASE)
    assert [r.recipient for r in first[0].recipients] == ["one@remote.test", "two@remote.test"]
    assert claims(store) == {rcpt: ("host-a/1/x", now + timedelta(seconds=LEASE))
                             for rcpt in ("one@remote.test", "two@remote.test")}

    for later in (0, 1, LEASE / 2, LEASE - 1):
        assert store.queue_claim("host-b/2/y", now + timedelta(seconds=later), 10, LEASE) == []

    # The first holder crashed: once the lease is over, another process takes the work.
    expired = now + timedelta(seconds=LEASE + 1)
    [job] = store.queue_claim("host-b/2/y", expired, 10, LEASE)
    assert job.queue_id == queue_id
    assert [(r.recipient, r.attempts) for r in job.recipients] == [
        ("one@remote.test", 0), ("two@remote.test", 0)]
    assert {by for by, _ in claims(store).values()} == {"host-b/2/y"}
    assert store.queue_claim("host-a/1/x", expired, 10, LEASE) == []


def test_concurrent_claims_from_two_processes_never_share_a_recipient(
        backend: str, db_url: str) -> None:
    if backend != "postgresql":
        pytest.skip("FOR UPDATE SKIP LOCKED is PostgreSQL's; SQLite has a single writer")
    setup = open_store(db_url, pool_size=2)
    stores = [open_store(db_url, pool_size=2, migrate=False) for _ in range(2)]
    try:
        batch = [Submission(new_queue_id(), None,
                            outbound(tuple(f"r{m}-{i}@remote{i % 3}.test" for i in range(10)),
                                     f"c{m}"))
                 for m in range(50)]
        assert all(isinstance(r, str) for r in setup.submit_many(batch))
        with setup.db.read() as conn:
            every_id = set(conn.scalars(select(t.outbound_recipients.c.id)))
        assert len(every_id) == 500
        now = soon()
        got: list[list[int]] = [[], []]
        rounds = [0, 0]
        start = threading.Barrier(2)

        def worker(n: int) -> None:
            start.wait()
            while True:
                jobs = stores[n].queue_claim(f"process-{n}", now, 7, LEASE)
                if not jobs:
                    return
                rounds[n] += 1
                got[n].extend(r.id for j in jobs for r in j.recipients)

        run_together(worker, 2)
        assert len(got[0]) == len(set(got[0])) and len(got[1]) == len(set(got[1]))
        assert not set(got[0]) & set(got[1]), "a recipient was claimed by both processes"
        assert set(got[0]) | set(got[1]) == every_id
        assert all(rounds), f"one process never got work: {rounds}"
        owners = _claim_owners(setup)
        assert all(owners[i] == "process-0" for i in got[0])
        assert all(owners[i] == "process-1" for i in got[1])
    finally:
        for opened in (setup, *stores):
            opened.close()


def test_two_processes_settling_a_messages_last_two_recipients_at_once_remove_it(
        backend: str, db_url: str) -> None:
    if backend != "postgresql":
        pytest.skip("concurrent writers are PostgreSQL's; SQLite has a single writer")
    setup = open_store(db_url, pool_size=2)
    stores = [open_store(db_url, pool_size=2, migrate=False) for _ in range(2)]
    try:
        batch = [Submission(new_queue_id(), None,
                            outbound((f"x{m}@one.test", f"y{m}@two.test"), f"p{m}"))
                 for m in range(100)]
        assert all(isinstance(r, str) for r in setup.submit_many(batch))
        now = soon()
        jobs = setup.queue_claim("both", now, 1000, LEASE)
        assert len(jobs) == 100 and all(len(j.recipients) == 2 for j in jobs)
        start = threading.Barrier(2)

        def worker(n: int) -> None:
            for job in jobs:  # both start each message together: they race on it
                start.wait(30)
                stores[n].queue_record(job, [Outcome(job.recipients[n], "delivered",
                                                     "250 ok", "mx")], now)

        run_together(worker, 2)
        assert setup.queue_size() == 0
        with setup.db.read() as conn:
            left = conn.scalars(select(t.outbound.c.queue_id)).all()
        assert left == [], f"{len(left)} message(s) left behind with no recipient"
        assert len(events(setup, "delivered")) == 200
    finally:
        for opened in (setup, *stores):
            opened.close()


def _claim_owners(store: Store) -> dict[int, str | None]:
    r = t.outbound_recipients
    with store.db.read() as conn:
        return dict(conn.execute(select(r.c.id, r.c.claimed_by)).tuples().all())


# --- outcomes ----------------------------------------------------------------------------

def test_record_removes_delivered_keeps_deferred_and_the_message_leaves_when_all_are_final(
        store: Store) -> None:
    sender, sender_id = new_account(store)
    queue_id = queue(store, outbound(
        ("ok@remote.test", "later@remote.test", "Gone@Remote.test"), "outcomes",
        sender=sender, account_id=sender_id))
    now = soon()
    job = claim_one_job(store, now)
    ok, later, gone = job.recipients
    retry_at = now + timedelta(minutes=5)

    store.queue_record(job, [
        Outcome(ok, "delivered", "250 2.0.0 queued as 1", "mx.remote.test"),
        Outcome(later, "deferred", "451 4.2.0 try later", "mx.remote.test", retry_at),
        Outcome(gone, "bounced", "550 5.1.1 no such user", "mx.remote.test", suppress=True),
    ], now)

    assert recipients_of(store, queue_id) == {
        "later@remote.test": ("deferred", 1, retry_at, "451 4.2.0 try later")}
    assert store.queue_message(queue_id) == message("outcomes")  # still waiting for one
    assert store.queue_size() == 1
    assert claims(store) == {"later@remote.test": (None, None)}  # the claim is given back
    [delivered] = events(store, "delivered", queue_id)
    assert delivered == {"queue_id": queue_id, "recipient": "ok@remote.test",
                         "reply": "250 2.0.0 queued as 1", "remote": "mx.remote.test",
                         "attempt": 1}
    [deferred] = events(store, "deferred", queue_id)
    assert deferred["recipient"] == "later@remote.test"
    assert deferred["reply"] == "451 4.2.0 try later"
    assert datetime.fromisoformat(deferred["next_attempt_at"]) == retry_at
    [bounced] = events(store, "bounced", queue_id)
    assert bounced["reply"] == "550 5.1.1 no such user"
    [suppressed] = events(store, "suppressed", queue_id)
    assert suppressed["recipient"] == "Gone@Remote.test"
    assert {e.account_id for e in store.events() if e.kind in ("delivered", "deferred")} == {
        sender_id}
    assert store.suppression_reason("gone@remote.test") == "550 5.1.1 no such user"
    assert [(a, why) for a, why, _ in store.suppression_list()] == [
        ("gone@remote.test", "550 5.1.1 no such user")]

    # Not due before its time; then delivered, and the message leaves the queue.
    assert store.queue_claim("worker/2", retry_at - timedelta(seconds=1), 10, LEASE) == []
    second = claim_one_job(store, retry_at, "worker/2")
    [again] = second.recipients
    assert (again.recipient, again.attempts) == ("later@remote.test", 1)
    store.queue_record(second, [Outcome(again, "delivered", "250 ok", "mx.remote.test")],
                       retry_at)
    assert store.queue_list() == []
    assert store.queue_message(queue_id) is None
    assert store.queue_data(job.outbound_id) is None
    assert store.queue_size() == 0
    assert [e["attempt"] for e in events(store, "delivered", queue_id)] == [1, 2]


def test_small_messages_come_with_their_claim_and_large_ones_are_read_apart(
        store: Store) -> None:
    large_raw = message("large", b"x" * (store.INLINE_DATA + 1))
    small = queue(store, outbound(("s@remote.test",), "small"))
    large = queue(store, outbound(("l@remote.test",), raw=large_raw))
    jobs = {job.queue_id: job for job in store.queue_claim("w", soon(), 10, LEASE)}
    assert jobs[small].data == message("small")
    assert jobs[large].data is None
    assert jobs[large].size == len(large_raw)
    assert store.queue_data(jobs[large].outbound_id) == large_raw


def test_settle_many_commits_many_attempts_and_a_bad_one_costs_no_other(store: Store) -> None:
    both = queue(store, outbound(("a@one.test", "b@two.test"), "both"))
    other = queue(store, outbound(("c@three.test",), "other"))
    broken = queue(store, outbound(("d@four.test",), "broken"))
    now = soon()
    jobs = {job.queue_id: job for job in store.queue_claim("w", now, 10, LEASE)}
    a, b = jobs[both].recipients
    [c], [d] = jobs[other].recipients, jobs[broken].recipients

    results = store.queue_settle_many([
        # One message's recipients, settled by two connections (one per domain).
        Settlement(jobs[both], (Outcome(a, "delivered", "250 a", "mx.one.test"),), now),
        Settlement(jobs[both], (Outcome(b, "delivered", "250 b", "mx.two.test"),), now),
        # A deferral without a next attempt cannot be stored.
        Settlement(jobs[broken], (Outcome(d, "deferred", "451 d", ""),), now),
        Settlement(jobs[other], (Outcome(c, "deferred", "451 c", "", now + timedelta(hours=1)),),
                   now),
    ])

    assert results[0] is None and results[1] is None and results[3] is None
    assert isinstance(results[2], Exception)
    assert store.queue_message(both) is None  # its last recipient went in the same batch
    assert recipients_of(store, other) == {
        "c@three.test": ("deferred", 1, now + timedelta(hours=1), "451 c")}
    assert recipients_of(store, broken) == {"d@four.test": ("queued", 0, jobs[broken].created_at,
                                                           None)}
    assert claims(store)["d@four.test"][0] == "w"  # still claimed: retried after the lease
    assert sorted(e["recipient"] for e in events(store, "delivered")) == ["a@one.test",
                                                                         "b@two.test"]
    assert events(store, "deferred", broken) == []


def test_deferring_counts_attempts_each_time(store: Store) -> None:
    queue_id = queue(store, outbound(("slow@remote.test",), "slow"))
    when = soon()
    for attempt in range(1, 4):
        job = claim_one_job(store, when)
        assert job.recipients[0].attempts == attempt - 1
        when += timedelta(minutes=attempt)
        store.queue_record(job, [Outcome(job.recipients[0], "deferred", f"451 try {attempt}",
                                         "", when)], when - timedelta(minutes=attempt))
        assert recipients_of(store, queue_id) == {
            "slow@remote.test": ("deferred", attempt, when, f"451 try {attempt}")}
    assert [e["attempt"] for e in events(store, "deferred", queue_id)] == [1, 2, 3]


def test_a_suppression_is_added_once_however_often_the_address_bounces(store: Store) -> None:
    first = queue(store, outbound(("gone@remote.test",), "first"))
    second = queue(store, outbound(("GONE@remote.test",), "second"))
    now = soon()
    jobs = store.queue_claim("w", now, 10, LEASE)
    assert [j.queue_id for j in jobs] == [first, second]
    for job, reply in zip(jobs, ("550 5.1.1 first", "550 5.1.1 second"), strict=True):
        store.queue_record(job, [Outcome(job.recipients[0], "bounced", reply, "mx",
                                         suppress=True)], now)
    assert [(a, why) for a, why, _ in store.suppression_list()] == [
        ("gone@remote.test", "550 5.1.1 first")]
    assert [e["queue_id"] for e in events(store, "suppressed")] == [first]
    assert len(events(store, "bounced")) == 2
    # A bounce without suppress (say, at DATA) adds nothing.
    third = queue(store, outbound(("other@remote.test",), "third"))
    job = claim_one_job(store, soon())
    store.queue_record(job, [Outcome(job.recipients[0], "bounced", "554 5.6.0 content", "")],
                       now)
    assert store.suppression_reason("other@remote.test") is None
    assert store.queue_message(third) is None


def test_a_bounce_for_a_local_return_to_lands_in_that_accounts_inbox(store: Store) -> None:
    alice, alice_id = new_account(store)
    queue_id = queue(store, outbound(("nobody@remote.test", "fine@remote.test"), "to-bounce",
                                     sender=alice, return_to=alice, account_id=alice_id))
    now = soon()
    job = claim_one_job(store, now)
    nobody, fine = job.recipients
    dsn = b"Subject: Undelivered Mail Returned to Sender\r\n\r\nsorry\r\n"
    store.queue_record(job, [Outcome(nobody, "bounced", "550 5.1.1 unknown", "mx"),
                             Outcome(fine, "delivered", "250 ok", "mx")], now, dsn)

    # Delivered here, so the envelope's null sender is recorded (RFC 5321 4.4).
    assert [m.raw for m in store.messages(alice)] == [b"Return-Path: <>\r\n" + dsn]
    [received] = [e for e in store.events("received") if e.account_id == alice_id]
    assert received.detail["bounce_for"] == queue_id
    assert store.queue_list() == []  # nothing was queued for the bounce itself


def test_a_bounce_for_a_remote_return_to_is_queued_with_a_null_sender(store: Store) -> None:
    queue_id = queue(store, outbound(("nobody@remote.test",), "forwarded",
                                     sender="SRS0=x=y=origin.test=someone@here.test",
                                     return_to="someone@origin.test"))
    now = soon()
    job = claim_one_job(store, now)
    dsn = b"Subject: Undelivered Mail Returned to Sender\r\n\r\nsorry\r\n"
    store.queue_record(job, [Outcome(job.recipients[0], "expired", "451 4.4.7 gave up", "")],
                       now, dsn)

    [entry] = store.queue_list()
    assert entry.queue_id != queue_id
    assert (entry.kind, entry.sender, entry.size) == ("bounce", "", len(dsn))
    assert [(r[0], r[1], r[2]) for r in entry.recipients] == [("someone@origin.test", "queued", 0)]
    assert store.queue_message(entry.queue_id) == dsn  # Return-Path is the receiver's job
    [queued] = events(store, "queued", entry.queue_id)
    assert queued["bounce_for"] == queue_id and queued["kind"] == "bounce"
    [expired] = events(store, "expired", queue_id)
    assert expired["reply"] == "451 4.4.7 gave up"
    # A bounce of the bounce would be a loop: the queued bounce has nobody to report to.
    [bounce_job] = store.queue_claim("w2", soon(), 10, LEASE)
    assert (bounce_job.sender, bounce_job.return_to, bounce_job.kind) == ("", "", "bounce")


def test_a_bounce_for_an_alias_return_to_goes_to_its_local_and_remote_destinations(
        store: Store) -> None:
    domain = new_domain(store)
    alice, alice_id = new_account(store, domain)
    store.alias_add(f"team@{domain}", [alice, "boss@elsewhere.test"])
    queue_id = queue(store, outbound(("x@remote.test",), "from-team", sender=f"team@{domain}",
                                     return_to=f"team@{domain}"))
    job = claim_one_job(store, soon())
    dsn = b"Subject: bounce\r\n\r\nsorry\r\n"
    store.queue_record(job, [Outcome(job.recipients[0], "bounced", "550 no", "mx")], soon(),
                       dsn)
    assert [m.raw for m in store.messages(alice)] == [b"Return-Path: <>\r\n" + dsn]
    [entry] = store.queue_list()
    assert entry.queue_id != queue_id and entry.kind == "bounce" and entry.sender == ""
    assert [r[0] for r in entry.recipients] == ["boss@elsewhere.test"]


def test_a_bounce_without_a_return_to_is_dropped(store: Store) -> None:
    alice, _ = new_account(store)
    queue_id = queue(store, outbound(("x@remote.test",), "no-return"))
    job = claim_one_job(store, soon())
    store.queue_record(job, [Outcome(job.recipients[0], "bounced", "550 no", "mx")], soon(),
                       b"Subject: bounce\r\n\r\nx\r\n")
    assert store.queue_list() == []
    assert store.messages(alice) == []
    assert len(events(store, "bounced", queue_id)) == 1


def test_recording_after_an_operator_deleted_the_message_brings_nothing_back(
        store: Store) -> None:
    queue_id = queue(store, outbound(("a@remote.test", "b@remote.test"), "racing"))
    now = soon()
    job = claim_one_job(store, now)
    assert store.queue_delete(queue_id) == 2
    a, b = job.recipients
    store.queue_record(job, [Outcome(a, "deferred", "451 later", "", now + timedelta(hours=1)),
                             Outcome(b, "delivered", "250 ok", "")], now)
    assert store.queue_list() == []
    assert store.queue_size() == 0
    assert store.queue_claim("w", now + timedelta(days=1), 10, LEASE) == []


# --- releasing, and the operator's commands ----------------------------------------------

def test_release_frees_the_claims_of_one_holder_prefix_only(store: Store) -> None:
    recipients = ("a@remote.test", "b@remote.test", "c@remote.test", "d@remote.test")
    for rcpt in recipients:
        queue(store, outbound((rcpt,), rcpt))
    now = soon()
    # Prefixes that a LIKE pattern would confuse: "_" matches any one character there.
    for holder in ("node_1/100/aa", "node_1/1000/bb", "nodeX1/100/cc", "node_1/2/dd"):
        assert len(store.queue_claim(holder, now, 1, LEASE)) == 1

    assert store.queue_release("node_1/100/") == 1
    held = {rcpt: by for rcpt, (by, _) in claims(store).items()}
    assert held == {"a@remote.test": None, "b@remote.test": "node_1/1000/bb",
                    "c@remote.test": "nodeX1/100/cc", "d@remote.test": "node_1/2/dd"}
    # What was given back is due again at once; the rest stays with its holders.
    [job] = store.queue_claim("other", now, 10, LEASE)
    assert [r.recipient for r in job.recipients] == ["a@remote.test"]
    assert store.queue_release("node_1/") == 2
    assert store.queue_release("node_1/") == 0
    assert {by for by, _ in claims(store).values()} == {"other", "nodeX1/100/cc", None}


def test_retry_makes_deferred_recipients_due_now(store: Store) -> None:
    one = queue(store, outbound(("a@remote.test", "b@remote.test"), "one"))
    two = queue(store, outbound(("c@remote.test",), "two"))
    now = soon()
    for job in store.queue_claim("w", now, 10, LEASE):
        store.queue_record(job, [Outcome(r, "deferred", "451 later", "",
                                         now + timedelta(hours=2)) for r in job.recipients], now)
    later = now + timedelta(minutes=1)
    assert store.queue_claim("w", later, 10, LEASE) == []

    assert store.queue_retry(one.lower(), later) == 2
    assert {rcpt: rest[2] for rcpt, rest in recipients_of(store, one).items()} == {
        "a@remote.test": later, "b@remote.test": later}
    [job] = store.queue_claim("w", later, 10, LEASE)
    assert job.queue_id == one and len(job.recipients) == 2
    assert recipients_of(store, two)["c@remote.test"][0:2] == ("deferred", 1)  # untouched

    assert store.queue_retry("NOSUCHID", later) == 0
    assert store.queue_retry(None, later) == 3
    [job] = store.queue_claim("w", later, 10, LEASE)  # `one` is still claimed
    assert job.queue_id == two


def test_delete_drops_the_message_and_its_recipients_with_deleted_events(
        store: Store) -> None:
    sender, sender_id = new_account(store)
    gone = queue(store, outbound(("a@remote.test", "b@remote.test"), "gone", sender=sender,
                                 account_id=sender_id))
    kept = queue(store, outbound(("c@remote.test",), "kept"))

    assert store.queue_delete(gone.lower()) == 2
    assert [e.queue_id for e in store.queue_list()] == [kept]
    assert store.queue_message(gone) is None
    assert store.queue_size() == 1
    deleted = [e for e in store.events("deleted")]
    assert sorted(e.detail["recipient"] for e in deleted) == ["a@remote.test", "b@remote.test"]
    assert {e.detail["queue_id"] for e in deleted} == {gone}
    assert {e.account_id for e in deleted} == {sender_id}
    assert store.queue_delete(gone) == 0
    assert store.queue_delete("NOSUCHID") == 0
    assert [e.queue_id for e in store.queue_list()] == [kept]
