"""Forwarding through an alias with the Sender Rewriting Scheme: the forward leaves with an
SRS0 envelope sender at our domain, the message unchanged but for our trace fields; a bounce
to that SRS address goes on to the original sender; a forged SRS address is refused."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass

import pytest

from mailsuite.mime import split_message
from tests.delivery.support import (
    Servers,
    Shared,
    routed,
    token,
    wait_event,
    wait_received,
)
from tests.harness import Mailsuite
from tests.smtpsink import SinkServer

REMOTE, ORIGIN = "127.0.0.13", "127.0.0.14"
ZONES = {
    **routed("remote.fwd.test", REMOTE),  # where the alias forwards to
    **routed("origin.fwd.test", ORIGIN),  # where the original sender's mail lives
}
TRACE_FIELDS = {"received", "authentication-results"}


@dataclass
class Forwarding:
    server: Mailsuite
    remote: SinkServer
    origin: SinkServer


@pytest.fixture(scope="module")
def fwd(shared: Shared, module_servers: Servers) -> Forwarding:
    module_servers.dns.add(ZONES)
    port = shared.port
    return Forwarding(
        remote=module_servers.sink(REMOTE, port, hostname="mx.remote.fwd.test"),
        origin=module_servers.sink(ORIGIN, port, hostname="mx.origin.fwd.test"),
        server=shared.server,
    )


def send_to_mx(server: Mailsuite, sender: str, recipient: str, raw: bytes) -> None:
    with smtplib.SMTP(*server.mx, local_hostname="client.origin.fwd.test", timeout=30) as smtp:
        assert smtp.sendmail(sender, [recipient], raw) == {}


def field_names(header: bytes) -> list[str]:
    return [line.split(b":", 1)[0].decode().lower() for line in header.split(b"\r\n")
            if line and line[:1] not in (b" ", b"\t")]


def forward_one(fwd: Forwarding) -> tuple[str, str, str, bytes, SinkServer]:
    """Mail from alice@origin to our alias, forwarded to the remote sink:
    (original sender, alias, target, original message, what the remote sink received)."""
    domain = fwd.server.new_domain()
    tag = token()
    alias, target = f"fwd{tag}@{domain}", f"someone{tag}@remote.fwd.test"
    original_sender = f"alice{tag}@origin.fwd.test"
    fwd.server.store.alias_add(alias, [target])
    raw = (f"From: Alice <{original_sender}>\r\nTo: <{alias}>\r\nSubject: forward me {tag}\r\n"
           f"Message-ID: <{tag}@origin.fwd.test>\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
           f"\r\nHello through the alias.\r\n.leading dot\r\n").encode()
    send_to_mx(fwd.server, original_sender, alias, raw)
    return original_sender, alias, target, raw, wait_received(fwd.remote, target)


def test_forward_uses_an_srs0_sender_at_our_domain_and_leaves_the_message_as_it_was(
        fwd: Forwarding) -> None:
    original_sender, alias, target, raw, received = forward_one(fwd)
    domain = alias.rpartition("@")[2]
    assert received.rcpts == [target]
    local, _, srs_domain = received.mail_from.rpartition("@")
    sender_local, _, sender_domain = original_sender.rpartition("@")
    assert local.startswith("SRS0=")  # SRS0=hash=stamp=origin.fwd.test=alice...
    assert local.endswith(f"={sender_domain}={sender_local}")
    assert srs_domain == domain
    # Our trace fields are prepended; everything the sender wrote is there byte for byte.
    assert received.data.endswith(raw)
    added, _ = split_message(received.data[:-len(raw)] + b"\r\n")
    assert set(field_names(added)) <= TRACE_FIELDS
    assert "received" in field_names(added)
    assert "DKIM-Signature" not in received.message
    assert wait_event(fwd.server, "delivered", target).detail["remote"] == "mx.remote.fwd.test"


def test_bounce_to_the_srs_address_goes_on_to_the_original_sender(fwd: Forwarding) -> None:
    original_sender, _, target, _, forwarded = forward_one(fwd)
    srs_address = forwarded.mail_from
    bounce = (f"From: MAILER-DAEMON@remote.fwd.test\r\nTo: <{srs_address}>\r\n"
              f"Subject: Undelivered Mail Returned to Sender\r\n"
              f"Message-ID: <bounce{token()}@remote.fwd.test>\r\n"
              f"Auto-Submitted: auto-replied\r\n\r\n<{target}>: no such user\r\n").encode()
    send_to_mx(fwd.server, "", srs_address, bounce)

    received = wait_received(fwd.origin, original_sender)
    assert received.mail_from == ""  # a bounce stays a bounce: MAIL FROM:<>
    assert received.rcpts == [original_sender]
    assert received.data.endswith(bounce)
    assert wait_event(fwd.server, "delivered", original_sender)


def test_tampered_srs_address_is_refused_at_rcpt_with_550(fwd: Forwarding) -> None:
    _, _, _, _, forwarded = forward_one(fwd)
    local, _, domain = forwarded.mail_from.rpartition("@")
    tag, digest, rest = local.split("=", 2)
    forged_digest = "".join("B" if c == "A" else "A" for c in digest)
    forgeries = [
        f"{tag}={forged_digest}={rest}@{domain}",  # the hash does not match
        f"{tag}={digest}={rest.replace('alice', 'mallory')}@{domain}",  # another victim
    ]
    with smtplib.SMTP(*fwd.server.mx, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        for forged in forgeries:
            assert smtp.mail("")[0] == 250
            code, text = smtp.rcpt(forged)
            assert code == 550, (forged, code, text)
            smtp.rset()


def test_only_a_bounce_may_use_an_srs_address_anything_else_gets_550(fwd: Forwarding) -> None:
    """A valid SRS address with a real sender would make every guessed hash a relay."""
    _, _, _, _, forwarded = forward_one(fwd)
    with smtplib.SMTP(*fwd.server.mx, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("someone@spf-pass.test")[0] == 250
        code, _ = smtp.rcpt(forwarded.mail_from)
        assert code == 550
