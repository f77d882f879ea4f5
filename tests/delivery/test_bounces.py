"""Giving up on a recipient that is only ever deferred: after [delivery] expire_after the
recipient expires, the sender gets a DSN that says so (RFC 3464: Action failed, the last 4.x.x
Status), and nothing is left in the queue."""

from __future__ import annotations

from tests.delivery.support import (
    Servers,
    delivery_overrides,
    dsn_blocks,
    events_for,
    message,
    parse,
    routed,
    submit,
    wait_dsn,
    wait_event,
    wait_until,
)
from tests.smtpsink import free_port_on

SINK = "127.0.0.21"
DOMAIN = "expiry.test"


def test_recipient_deferred_until_expire_after_expires_with_a_dsn_and_leaves_the_queue(
        servers: Servers) -> None:
    servers.dns.add(routed(DOMAIN, SINK))
    port = free_port_on([SINK])
    sink = servers.sink(SINK, port, rcpt_reply=lambda address: (451, "4.3.2 system busy"))
    server = servers.mailsuite(delivery_overrides(port, delivery={"expire_after": "3s"}))
    sender = server.new_account()
    rcpt = f"late@{DOMAIN}"
    raw, message_id = message(sender, [rcpt], "never arrives")
    assert submit(server, sender, [rcpt], raw) == {}

    expired = wait_event(server, "expired", rcpt)
    assert expired.detail["reply"] == "451 4.3.2 system busy"
    deferred = events_for(server, "deferred", rcpt)
    assert len(deferred) >= 1 and expired.detail["attempt"] == len(deferred) + 1
    assert not events_for(server, "bounced", rcpt)
    assert not sink.messages

    dsn, block = wait_dsn(server, sender, rcpt)
    assert parse(dsn)["Subject"].endswith("Delivery time expired")
    assert block["action"] == "failed"
    assert block["status"] == "4.3.2"
    assert block["diagnostic-code"] == "smtp; 451 4.3.2 system busy"
    assert block["remote-mta"] == f"dns; mx.{DOMAIN}"
    assert dsn_blocks(dsn)[0]["arrival-date"]
    assert message_id in dsn.decode()

    wait_until(lambda: server.store.queue_size() == 0, "an empty queue")
    assert server.store.queue_list() == []
    attempts = len([r for r, _ in sink.rcpt_log if r == rcpt])
    assert attempts == expired.detail["attempt"]  # and no attempt after the expiry
