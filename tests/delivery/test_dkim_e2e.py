"""What goes on the wire: a DKIM signature that verifies at the receiver (RFC 6376) after
dot-stuffing (RFC 5321 4.5.2) and 8-bit transport (RFC 6152), and the extensions a message
needs: a server without 8BITMIME gets no 8-bit message (5.6.3), one without SMTPUTF8 no
internationalised address (RFC 6531, 5.6.7); both are bounced rather than mangled."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dkim
import pytest

from mailsuite.dkim import DKIMKey, generate_key, public_record
from tests.delivery.support import (
    Servers,
    Shared,
    events_for,
    message,
    message_id_of,
    routed,
    submit,
    token,
    wait_dsn,
    wait_event,
    wait_received,
)
from tests.harness import Mailsuite
from tests.smtpsink import SinkServer

FULL, NO_8BIT, NO_UTF8 = "127.0.0.10", "127.0.0.11", "127.0.0.12"
ZONES = {
    **routed("wire.dkim.test", FULL),
    **routed("seven.dkim.test", NO_8BIT),
    **routed("ascii.dkim.test", NO_UTF8),
}
BODY = ("Grüße aus Köln, 東京 too.\r\n"
        ".a line that starts with a dot\r\n"
        "..and one with two\r\n"
        ".\r\n"
        "the end\r\n")


@dataclass
class Wire:
    server: Mailsuite
    full: SinkServer
    no_8bit: SinkServer
    no_utf8: SinkServer


@pytest.fixture(scope="module")
def wire(shared: Shared, module_servers: Servers) -> Wire:
    module_servers.dns.add(ZONES)
    port = shared.port
    return Wire(
        full=module_servers.sink(FULL, port),
        no_8bit=module_servers.sink(NO_8BIT, port, eightbitmime=False),
        no_utf8=module_servers.sink(NO_UTF8, port, smtputf8=False),
        server=shared.server,
    )


def signing_sender(server: Mailsuite) -> tuple[str, DKIMKey]:
    """A new account whose domain signs with a new RSA key."""
    domain = server.new_domain()
    key = generate_key(domain)
    server.store.dkim_key_add(domain, key.selector, key.algorithm, key.private_key)
    return server.new_account(domain), key


def dns_for(key: DKIMKey) -> Callable[..., bytes | None]:
    """A dkimpy dnsfunc that knows the key's public record."""
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        wanted = f"{key.selector}._domainkey.{key.domain}"
        if name.decode("ascii").rstrip(".").lower() == wanted:
            return public_record(key).encode("ascii")
        return None

    return dnsfunc


def test_signed_8bit_message_with_leading_dots_verifies_at_the_receiver(wire: Wire) -> None:
    sender, key = signing_sender(wire.server)
    rcpt = f"r{token()}@wire.dkim.test"
    raw, message_id = message(sender, [rcpt], "on the wire", body=BODY)
    assert submit(wire.server, sender, [rcpt], raw, mail_options=["BODY=8BITMIME"]) == {}
    received = wait_received(wire.full, rcpt)
    assert message_id_of(received) == message_id

    assert received.mail_params.get("BODY") == "8BITMIME"
    assert "SMTPUTF8" not in received.mail_params
    # Dot-stuffed on the wire, exactly the submitted body once unstuffed.
    assert b"\r\n..a line that starts with a dot\r\n...and one with two\r\n..\r\nthe end" \
        in received.wire
    assert received.data.endswith(b"\r\n\r\n" + BODY.encode("utf-8"))
    assert b"\r\n..a line" not in received.data
    # The signature holds over what arrived.
    signature = str(received.message["DKIM-Signature"])
    assert f"d={key.domain};" in signature.replace(" ", "")
    assert f"s={key.selector};" in signature.replace(" ", "")
    assert dkim.verify(received.data, dnsfunc=dns_for(key)) is True
    # ... and is not just any signature: a changed body fails it.
    tampered = received.data.replace("Köln".encode(), b"Bonn")
    assert dkim.verify(tampered, dnsfunc=dns_for(key)) is False


def test_a_domain_with_rsa_and_ed25519_keys_sends_two_signatures_that_both_verify(
        wire: Wire) -> None:
    """RFC 8463: Ed25519 as a second signature beside RSA, for receivers that know it."""
    domain = wire.server.new_domain()
    keys = [generate_key(domain), generate_key(domain, "ed25519-sha256")]
    for key in keys:
        wire.server.store.dkim_key_add(domain, key.selector, key.algorithm, key.private_key)
    sender = wire.server.new_account(domain)
    rcpt = f"r{token()}@wire.dkim.test"
    raw, _ = message(sender, [rcpt], "two signatures", body=BODY)
    assert submit(wire.server, sender, [rcpt], raw, mail_options=["BODY=8BITMIME"]) == {}
    received = wait_received(wire.full, rcpt)

    records = {f"{k.selector}._domainkey.{k.domain}": public_record(k) for k in keys}

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        record = records.get(name.decode("ascii").rstrip(".").lower())
        return record.encode("ascii") if record else None

    signatures = received.message.get_all("DKIM-Signature")
    assert len(signatures) == 2
    assert ["a=rsa-sha256" in s.replace(" ", "") for s in signatures] == [True, False]
    verifier = dkim.DKIM(received.data)
    assert [verifier.verify(idx=i, dnsfunc=dnsfunc) for i in range(2)] == [True, True]


def test_8bit_message_to_a_server_without_8bitmime_bounces_with_5_6_3(wire: Wire) -> None:
    sender, _ = signing_sender(wire.server)
    eight, seven = f"e{token()}@seven.dkim.test", f"s{token()}@seven.dkim.test"
    raw, _ = message(sender, [eight], "8-bit", body=BODY)
    assert submit(wire.server, sender, [eight], raw, mail_options=["BODY=8BITMIME"]) == {}
    _, block = wait_dsn(wire.server, sender, eight)
    assert (block["action"], block["status"]) == ("failed", "5.6.3")
    assert "8BITMIME" in block["diagnostic-code"]
    assert not events_for(wire.server, "deferred", eight)
    # Never sent, not even in part; and the address is not the remote's fault: no suppression.
    assert not [r for r, _ in wire.no_8bit.rcpt_log if r == eight]
    assert eight not in [s[0] for s in wire.server.store.suppression_list()]

    # A 7-bit message goes to the same server as usual, without BODY=8BITMIME.
    raw, message_id = message(sender, [seven], "7-bit")
    assert submit(wire.server, sender, [seven], raw) == {}
    received = wait_received(wire.no_8bit, seven)
    assert message_id_of(received) == message_id
    assert "BODY" not in received.mail_params


def test_internationalised_address_is_delivered_with_smtputf8(wire: Wire) -> None:
    sender, _ = signing_sender(wire.server)
    rcpt = f"用户{token()}@wire.dkim.test"
    raw, message_id = message(sender, [rcpt], "utf8")
    assert submit(wire.server, sender, [rcpt], raw, mail_options=["SMTPUTF8"]) == {}
    received = wait_received(wire.full, rcpt)
    assert message_id_of(received) == message_id
    assert received.rcpts == [rcpt]
    assert "SMTPUTF8" in received.mail_params
    assert wait_event(wire.server, "delivered", rcpt)


def test_internationalised_address_to_a_server_without_smtputf8_bounces_with_5_6_7(
        wire: Wire) -> None:
    sender, _ = signing_sender(wire.server)
    rcpt = f"用户{token()}@ascii.dkim.test"
    raw, _ = message(sender, [rcpt], "utf8 to ascii")
    assert submit(wire.server, sender, [rcpt], raw, mail_options=["SMTPUTF8"]) == {}
    _, block = wait_dsn(wire.server, sender, rcpt)
    assert (block["action"], block["status"]) == ("failed", "5.6.7")
    assert "SMTPUTF8" in block["diagnostic-code"]
    assert not events_for(wire.server, "deferred", rcpt)
    assert not wire.no_utf8.messages
    assert not [c for c in wire.no_utf8.commands if c.upper().startswith("MAIL")]
