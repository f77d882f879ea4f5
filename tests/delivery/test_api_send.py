"""An API send leaves through the queue like a submission: DKIM-signed, and as the same bytes
as the same message submitted on port 587, apart from the trace fields and the signature."""

from __future__ import annotations

import email
from email import policy

import dkim
import pytest

from mailsuite.dkim import DKIMKey, generate_key, public_record
from tests.delivery.support import (
    Servers,
    Shared,
    routed,
    submit,
    token,
    wait_received,
)
from tests.harness import Mailsuite
from tests.smtpsink import SinkServer
from tests.web.client import ApiClient

REMOTE = "127.0.0.15"
DOMAIN = "api.send.test"


@pytest.fixture(scope="module")
def sink(shared: Shared, module_servers: Servers) -> SinkServer:
    module_servers.dns.add(routed(DOMAIN, REMOTE))
    return module_servers.sink(REMOTE, shared.port)


def without_trace(raw: bytes) -> bytes:
    """The message without Received and DKIM-Signature fields (they name the path and time)."""
    message = email.message_from_bytes(raw, policy=policy.SMTP)
    del message["Received"]
    del message["DKIM-Signature"]
    return message.as_bytes()


def dns_for(key: DKIMKey):  # type: ignore[no-untyped-def]
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        if name.decode("ascii").rstrip(".").lower() == f"{key.selector}._domainkey.{key.domain}":
            return public_record(key).encode("ascii")
        return None
    return dnsfunc


def test_an_api_send_is_signed_and_is_the_same_message_as_a_submission(
        shared: Shared, sink: SinkServer) -> None:
    server: Mailsuite = shared.server
    domain = server.new_domain()
    key = generate_key(domain)
    server.store.dkim_key_add(domain, key.selector, key.algorithm, key.private_key)
    sender = server.new_account(domain)
    _, secret = server.store.api_key_add("sender", ["messages:send"], inboxes=[sender])
    by_api, by_smtp = f"a{token()}@{DOMAIN}", f"s{token()}@{DOMAIN}"

    reply = ApiClient(server.http, secret).post(f"/v1/inboxes/{sender}/messages/send", {
        "to": by_api, "subject": "over the API", "text": "Grüße, signed.\n.a dot line\n"})
    assert reply.status == 202, reply.body
    assert reply.json["recipients"] == [{"address": by_api, "status": "queued"}]
    arrived = wait_received(sink, by_api)
    assert arrived.mail_from == sender
    assert dkim.verify(arrived.data, dnsfunc=dns_for(key)) is True
    assert f"s={key.selector}" in str(email.message_from_bytes(arrived.data)["DKIM-Signature"])

    # The same message through port 587 comes out the same but for trace and signature.
    assert submit(server, sender, [by_smtp], without_trace(arrived.data)) == {}
    submitted = wait_received(sink, by_smtp)
    assert dkim.verify(submitted.data, dnsfunc=dns_for(key)) is True
    assert without_trace(submitted.data) == without_trace(arrived.data)
