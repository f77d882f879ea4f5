"""The queue survives the server: mail queued before a SIGTERM is delivered exactly once after
the restart; after a SIGKILL in the middle of delivering nothing is lost, and only a message
that was in flight at the kill may arrive twice (at least once, never lost)."""

from __future__ import annotations

import signal
from collections import Counter

from tests.delivery.support import (
    Servers,
    delivery_overrides,
    events_for,
    message_id_of,
    routed,
    submit_many,
    wait_until,
)
from tests.harness import Mailsuite
from tests.smtpsink import free_port_on

SINK = "127.0.0.22"
DOMAIN = "durable.test"
PER_DOMAIN = 5  # [delivery] max_connections_per_domain: the most messages in flight at once


def delivered_count(server: Mailsuite, recipients: list[str]) -> int:
    wanted = {r.lower() for r in recipients}
    return sum(1 for e in server.store.events("delivered", limit=100000)
               if e.detail["recipient"].lower() in wanted)


def test_mail_queued_before_sigterm_is_delivered_exactly_once_after_restart(
        servers: Servers) -> None:
    servers.dns.add(routed(DOMAIN, SINK))
    port = free_port_on([SINK])
    sink = servers.sink(SINK, port, start=False)  # not listening yet: connection refused
    server = servers.mailsuite(delivery_overrides(port))
    sender = server.new_account()
    recipients = [f"term{n}@{DOMAIN}" for n in range(50)]
    message_ids = submit_many(server, sender, recipients, "sigterm", 50)
    assert server.store.queue_size() == 50
    wait_until(lambda: events_for(server, "deferred", recipients[-1]), "a failed attempt")

    server.stop(signal.SIGTERM)
    sink.start()
    server.start()

    wait_until(lambda: server.store.queue_size() == 0, "an empty queue")
    wait_until(lambda: len(sink.messages) >= 50, "50 messages at the sink")
    assert Counter(message_id_of(m) for m in sink.messages) == Counter(message_ids)
    assert sorted(r for m in sink.messages for r in m.rcpts) == sorted(recipients)
    assert delivered_count(server, recipients) == 50


def test_sigkill_while_delivering_loses_nothing_and_repeats_only_what_was_in_flight(
        servers: Servers) -> None:
    servers.dns.add(routed(DOMAIN, SINK))
    port = free_port_on([SINK])
    sink = servers.sink(SINK, port, delay=0.3)  # each reply 0.3 s late: a slow remote
    # claim_timeout small, so the restarted server soon retries what the dead one claimed;
    # claims of no more than can be sent at once, so that no claim runs out in a live server
    # (that case is the next test's).
    server = servers.mailsuite(delivery_overrides(port, delivery={
        "command_timeout": 2, "claim_timeout": 4, "claim_batch": PER_DOMAIN,
        "max_connections_per_domain": PER_DOMAIN}))
    sender = server.new_account()
    recipients = [f"kill{n}@{DOMAIN}" for n in range(12)]
    message_ids = submit_many(server, sender, recipients, "sigkill", len(recipients))
    by_rcpt = dict(zip(recipients, message_ids, strict=True))

    # The remote has read a message, and its 250 is still on the way: kill.
    wait_until(lambda: sink.messages, "the first delivery")
    server.stop(signal.SIGKILL)
    assert len(sink.messages) < len(recipients), "the kill came too late to test anything"
    settled = {by_rcpt[e.detail["recipient"]]
               for e in server.store.events("delivered", limit=100000)}
    before_restart = {message_id_of(m) for m in list(sink.messages)}
    # Received by the remote, but our record of it died with the process.
    in_flight = before_restart - settled
    assert len(in_flight) <= PER_DOMAIN

    server.start()
    wait_until(lambda: server.store.queue_size() == 0, "an empty queue", timeout=30)
    counts = Counter(message_id_of(m) for m in sink.messages)
    assert set(counts) == set(message_ids)  # nothing lost
    duplicates = {mid for mid, n in counts.items() if n > 1}
    assert max(counts.values()) <= 2
    assert duplicates <= in_flight, (duplicates, in_flight)
    assert len(duplicates) <= PER_DOMAIN


def test_a_delivery_that_outlasts_its_claim_is_not_sent_again_by_the_same_server(
        servers: Servers) -> None:
    """No crash here: a slow remote (every reply 0.4 s late, each well within
    command_timeout) makes one transaction last longer than claim_timeout. The claim runs out
    while the message is on the wire; the server must not claim and send it a second time."""
    servers.dns.add(routed(DOMAIN, SINK))
    port = free_port_on([SINK])
    sink = servers.sink(SINK, port, delay=0.4)  # greeting to final reply: 6 x 0.4 = 2.4 s
    server = servers.mailsuite(delivery_overrides(port, delivery={
        "command_timeout": 1, "claim_timeout": 2, "poll_interval": 0.05}))
    sender = server.new_account()
    rcpt = f"slow@{DOMAIN}"
    [message_id] = submit_many(server, sender, [rcpt], "slow", 1)

    wait_until(lambda: server.store.queue_size() == 0, "an empty queue")
    # With nothing else to send the server says QUIT; a second copy would come before it.
    wait_until(lambda: "QUIT" in sink.commands, "the end of the session")
    assert [message_id_of(m) for m in sink.messages] == [message_id]
    assert len(events_for(server, "delivered", rcpt)) == 1
