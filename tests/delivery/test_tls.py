"""TLS on outbound delivery: opportunistic STARTTLS (RFC 3207, RFC 7435) wherever it is
offered, and for the domains in [delivery] require_tls a verified certificate for the MX
host name or no delivery at all (deferred, never sent in plaintext)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.delivery.support import (
    SHARED_REQUIRE_TLS,
    Servers,
    Shared,
    events_for,
    message,
    message_id_of,
    routed,
    submit,
    token,
    wait_event,
    wait_received,
    wait_until,
)
from tests.harness import Mailsuite
from tests.smtpsink import SinkServer, make_certificate

OPPORTUNISTIC, SECURE, PLAIN, WRONG_NAME = "127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9"

ZONES = {
    **routed("opportunistic.tls.test", OPPORTUNISTIC),
    **routed("secure.tls.test", SECURE),  # required; certificate for mx.secure.tls.test
    **routed("plain.tls.test", PLAIN),  # required; no STARTTLS
    **routed("wrongname.tls.test", WRONG_NAME),  # required; certificate for another name
}
# The shared mailsuite requires TLS for these (SHARED_REQUIRE_TLS), verified against shared.ca.
assert set(SHARED_REQUIRE_TLS) == {"secure.tls.test", "plain.tls.test", "wrongname.tls.test"}


@dataclass
class TLSSetup:
    server: Mailsuite
    opportunistic: SinkServer
    secure: SinkServer
    plain: SinkServer
    wrong_name: SinkServer


@pytest.fixture(scope="module")
def tls(shared: Shared, module_servers: Servers,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSSetup]:
    module_servers.dns.add(ZONES)
    certs: Path = tmp_path_factory.mktemp("certs")
    ca, port = shared.ca, shared.port
    setup = TLSSetup(
        server=shared.server,
        opportunistic=module_servers.sink(
            OPPORTUNISTIC, port, starttls=make_certificate(certs, "mx.opportunistic.tls.test")),
        secure=module_servers.sink(
            SECURE, port, starttls=make_certificate(certs, "mx.secure.tls.test", ca)),
        plain=module_servers.sink(PLAIN, port),
        wrong_name=module_servers.sink(
            WRONG_NAME, port, starttls=make_certificate(certs, "mx.elsewhere.test", ca)),
    )
    yield setup
    # What is still deferred here would be retried for as long as the shared server runs.
    for entry in shared.server.store.queue_list():
        if all(rcpt.endswith(".tls.test") for rcpt, *_ in entry.recipients):
            shared.server.store.queue_delete(entry.queue_id)


def send(server: Mailsuite, rcpt: str) -> str:
    sender = server.new_account()
    raw, message_id = message(sender, [rcpt], "tls")
    assert submit(server, sender, [rcpt], raw) == {}
    return message_id


def test_starttls_is_used_when_offered_even_with_a_self_signed_certificate(
        tls: TLSSetup) -> None:
    rcpt = f"r{token()}@opportunistic.tls.test"
    message_id = send(tls.server, rcpt)
    received = wait_received(tls.opportunistic, rcpt)
    assert message_id_of(received) == message_id
    assert received.tls is True
    assert tls.opportunistic.tls_failures == 0


def test_required_tls_delivers_over_starttls_with_a_certificate_verified_for_the_mx_name(
        tls: TLSSetup) -> None:
    rcpt = f"r{token()}@secure.tls.test"
    message_id = send(tls.server, rcpt)
    received = wait_received(tls.secure, rcpt)
    assert message_id_of(received) == message_id
    assert received.tls is True
    assert wait_event(tls.server, "delivered", rcpt).detail["remote"] == "mx.secure.tls.test"


def test_required_tls_without_starttls_defers_and_sends_nothing_in_plaintext(
        tls: TLSSetup) -> None:
    rcpt = f"r{token()}@plain.tls.test"
    send(tls.server, rcpt)
    deferred = wait_event(tls.server, "deferred", rcpt)
    assert deferred.detail["reply"].startswith("451 4.7.")
    assert "TLS" in deferred.detail["reply"]
    # Retried, and still never in plaintext: no MAIL, no RCPT, no message.
    wait_until(lambda: len(events_for(tls.server, "deferred", rcpt)) >= 2, "a second attempt")
    assert not events_for(tls.server, "delivered", rcpt)
    assert not tls.plain.messages
    assert not [c for c in tls.plain.commands if c.upper().startswith(("MAIL", "RCPT"))]
    assert tls.plain.connections >= 2


def test_required_tls_with_a_certificate_for_another_name_defers(tls: TLSSetup) -> None:
    rcpt = f"r{token()}@wrongname.tls.test"
    send(tls.server, rcpt)
    deferred = wait_event(tls.server, "deferred", rcpt)
    assert deferred.detail["reply"].startswith("451 4.7.")
    assert "TLS" in deferred.detail["reply"]
    wait_until(lambda: len(events_for(tls.server, "deferred", rcpt)) >= 2, "a second attempt")
    assert not events_for(tls.server, "delivered", rcpt)
    assert not tls.wrong_name.messages
    # The handshake was broken off, and the message never went out without TLS instead.
    assert tls.wrong_name.tls_failures >= 1
    assert not [c for c in tls.wrong_name.commands if c.upper().startswith(("MAIL", "RCPT"))]
