"""Each recipient of a transaction has its own outcome (RFC 5321 3.3, 4.2.5): one accepted,
one deferred (4xx, retried), one refused (5xx, bounced with a DSN and suppressed)."""

from __future__ import annotations

import smtplib
from collections import Counter

import pytest

from tests.delivery.support import (
    Servers,
    delivery_overrides,
    events_for,
    message,
    message_id_of,
    routed,
    submit,
    wait_dsn,
    wait_event,
    wait_received,
    wait_until,
)
from tests.smtpsink import by_local_part, free_port_on

SINK = "127.0.0.20"
DOMAIN = "replies.test"
DEFER = (451, "4.2.0 mailbox busy, try later")
REJECT = (550, "5.1.1 no such user here")


def test_per_recipient_replies_deliver_defer_and_bounce_within_one_transaction(
        servers: Servers) -> None:
    servers.dns.add(routed(DOMAIN, SINK))
    port = free_port_on([SINK])
    sink = servers.sink(SINK, port, rcpt_reply=by_local_part(
        {"defer": DEFER, "reject": REJECT}))
    server = servers.mailsuite(delivery_overrides(port))
    sender = server.new_account()
    ok, defer, reject = (f"{local}@{DOMAIN}" for local in ("ok", "defer", "reject"))
    raw, message_id = message(sender, [ok, defer, reject], "three fates")
    assert submit(server, sender, [ok, defer, reject], raw) == {}

    # First attempt: the three RCPTs go in one transaction, and each gets its own reply.
    assert message_id_of(wait_received(sink, ok)) == message_id
    first = wait_event(server, "deferred", defer)
    assert first.detail["reply"].startswith("451 4.2.0 mailbox busy")
    assert sink.messages[0].rcpts == [ok]

    # The refused one: bounced with the remote's words, and suppressed.
    bounced = wait_event(server, "bounced", reject)
    assert bounced.detail["reply"] == "550 5.1.1 no such user here"
    dsn, block = wait_dsn(server, sender, reject)
    assert block["action"] == "failed"
    assert block["status"] == "5.1.1"
    assert block["remote-mta"] == f"dns; mx.{DOMAIN}"
    assert block["diagnostic-code"] == "smtp; 550 5.1.1 no such user here"
    assert message_id in dsn.decode()
    suppressed = {address: reason for address, reason, _ in server.store.suppression_list()}
    assert suppressed.get(reject) == "550 5.1.1 no such user here"
    assert wait_event(server, "suppressed", reject)
    # ... so a later submission to it is refused at RCPT, before anything is queued.
    raw2, _ = message(sender, [reject], "again")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        submit(server, sender, [reject], raw2)
    code, text = refused.value.recipients[reject]
    assert code == 550, text
    assert b"suppressed" in text
    # Only the deferred recipient is left in the queue.
    [entry] = server.store.queue_list()
    assert [rcpt[:2] for rcpt in entry.recipients] == [(defer, "deferred")]

    # The deferred recipient is retried (retry_schedule 1s) until the remote takes it.
    wait_until(lambda: len(events_for(server, "deferred", defer)) >= 2, "a second attempt")
    sink.rcpt_reply = None  # from now on every RCPT gets 250
    delivered = wait_event(server, "delivered", defer)
    assert delivered.detail["attempt"] >= 2
    assert message_id_of(wait_received(sink, defer)) == message_id
    wait_until(lambda: server.store.queue_size() == 0, "an empty queue")

    # The retry carried the deferred recipient only: ok@ got the message exactly once,
    # and the refused address was never tried again.
    copies = Counter(rcpt for m in sink.messages for rcpt in m.rcpts)
    assert copies == {ok: 1, defer: 1}
    assert [r for r, _ in sink.rcpt_log].count(reject) == 1
    assert len(events_for(server, "delivered", ok)) == 1
    assert len([m for m in server.inbox(sender) if b"multipart/report" in m]) == 1  # no more DSNs


def test_a_policy_refusal_at_rcpt_bounces_but_does_not_suppress_the_address(
        servers: Servers) -> None:
    """554 5.7.1 (say, our address on a blocklist) says nothing about the mailbox: only
    5.1.x answers put an address on the suppression list."""
    domain = "policy.replies.test"
    servers.dns.add(routed(domain, "127.0.0.21"))
    port = free_port_on(["127.0.0.21"])
    servers.sink("127.0.0.21", port, rcpt_reply=lambda address: (554, "5.7.1 you are listed"))
    server = servers.mailsuite(delivery_overrides(port))
    sender = server.new_account()
    target = f"someone@{domain}"
    raw, _ = message(sender, [target], "blocked")
    assert submit(server, sender, [target], raw) == {}
    assert wait_event(server, "bounced", target).detail["reply"] == "554 5.7.1 you are listed"
    _, block = wait_dsn(server, sender, target)
    assert block["status"] == "5.7.1"
    assert target not in {address for address, _, _ in server.store.suppression_list()}
    assert not events_for(server, "suppressed", target)
