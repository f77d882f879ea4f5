"""A smarthost ([relay]): every remote recipient goes to it, whatever DNS says about the
recipient's domain, over STARTTLS and with AUTH (RFC 4954); refused credentials defer."""

from __future__ import annotations

from pathlib import Path

from tests.delivery.support import (
    Servers,
    delivery_overrides,
    events_for,
    message,
    message_id_of,
    routed,
    submit,
    token,
    wait_event,
    wait_until,
)
from tests.harness import Mailsuite
from tests.smtpsink import SinkServer, free_port_on, make_certificate

RELAY = "127.0.0.25"
DECOY = "127.0.0.24"  # the MX that DNS names for mx.relay.test: must never be used
CREDENTIALS = ("u", "p")


def start(servers: Servers, certs: Path,
          password: str) -> tuple[Mailsuite, SinkServer, SinkServer]:
    servers.dns.add(routed("mx.relay.test", DECOY))
    relay_port, mx_port = free_port_on([RELAY]), free_port_on([DECOY])
    relay = servers.sink(RELAY, relay_port, hostname="smarthost.relay.test",
                         starttls=make_certificate(certs, "smarthost.relay.test"),
                         auth=CREDENTIALS)
    decoy = servers.sink(DECOY, mx_port, hostname="decoy.relay.test")
    server = servers.mailsuite(delivery_overrides(mx_port, relay={
        "host": RELAY, "port": relay_port, "tls": "starttls", "verify": False,
        "username": CREDENTIALS[0], "password": password}))
    return server, relay, decoy


def test_every_domain_goes_through_the_smarthost_over_tls_with_auth(
        servers: Servers, tmp_path: Path) -> None:
    server, relay, decoy = start(servers, tmp_path, CREDENTIALS[1])
    sender = server.new_account()
    tag = token()
    recipients = [
        f"a{tag}@mx.relay.test",  # has an MX of its own
        f"b{tag}@nxdomain.relay.test",  # does not exist in DNS at all
        f"c{tag}@elsewhere.example",  # nor does this one
    ]
    raw, first = message(sender, recipients, "via smarthost")
    assert submit(server, sender, recipients, raw) == {}
    raw, second = message(sender, [recipients[1]], "via smarthost again")
    assert submit(server, sender, [recipients[1]], raw) == {}

    for rcpt in recipients:
        wait_event(server, "delivered", rcpt)
    wait_until(lambda: len(events_for(server, "delivered", recipients[1])) == 2,
               "the second message")
    assert sorted(message_id_of(m) for m in relay.messages) == sorted([first, second])
    for received in relay.messages:
        assert received.tls is True
        assert received.auth_user == CREDENTIALS[0]
        assert received.mail_from == sender
    assert sorted(r for m in relay.messages for r in m.rcpts) == sorted(
        [*recipients, recipients[1]])
    assert not decoy.connections
    assert wait_event(server, "delivered", recipients[2]).detail["remote"] == RELAY


def test_smarthost_refusing_our_credentials_defers_and_nothing_is_delivered(
        servers: Servers, tmp_path: Path) -> None:
    server, relay, decoy = start(servers, tmp_path, "wrong")
    sender = server.new_account()
    rcpt = f"r{token()}@mx.relay.test"
    raw, _ = message(sender, [rcpt], "wrong password")
    assert submit(server, sender, [rcpt], raw) == {}

    deferred = wait_event(server, "deferred", rcpt)
    assert deferred.detail["reply"].startswith("451 4.7.")
    assert "credentials" in deferred.detail["reply"]
    wait_until(lambda: len(events_for(server, "deferred", rcpt)) >= 2, "a second attempt")
    assert not events_for(server, "delivered", rcpt)
    assert not events_for(server, "bounced", rcpt)
    assert not relay.messages
    assert not [c for c in relay.commands if c.upper().startswith(("MAIL", "RCPT"))]
    assert not decoy.connections  # no falling back to the MX either
    [entry] = server.store.queue_list()
    assert [r[:2] for r in entry.recipients] == [(rcpt, "deferred")]
