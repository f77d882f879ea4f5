"""An API key whose reach includes an inbox opens it over IMAP and POP3 (messages:read) and
submits for it over SMTP (messages:send); revoking or rotating the key ends that."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
from collections.abc import Callable

import pytest

from tests.harness import Mailsuite
from tests.web.client import ApiClient


@pytest.fixture
def server(start_mailsuite: Callable[..., Mailsuite]) -> Mailsuite:
    # Plain text on loopback keeps this about keys; TLS is tested with passwords elsewhere.
    return start_mailsuite({"auth": {"allow_plaintext": True}})


def imap_ok(server: Mailsuite, user: str, secret: str) -> bool:
    client = imaplib.IMAP4(*server.imap)
    try:
        client.login(user, secret)
    except imaplib.IMAP4.error:
        return False
    status, _ = client.select("INBOX")
    client.logout()
    return status == "OK"


def pop3_ok(server: Mailsuite, user: str, secret: str) -> bool:
    client = poplib.POP3(*server.pop3, timeout=30)
    try:
        client.user(user)
        client.pass_(secret)
    except poplib.error_proto:
        return False
    client.quit()
    return True


def submit_ok(server: Mailsuite, user: str, secret: str) -> bool:
    with smtplib.SMTP(*server.submission, timeout=30) as smtp:
        smtp.ehlo()
        try:
            smtp.login(user, secret)
        except smtplib.SMTPAuthenticationError:
            return False
        message = f"From: {user}\r\nSubject: via key\r\n\r\nhi\r\n".encode()
        return smtp.sendmail(user, [user], message) == {}


def test_keys_open_the_inboxes_they_reach_with_the_scopes_they_hold(server: Mailsuite) -> None:
    _, admin = server.store.api_key_add("admin", ["admin"])
    api = ApiClient(server.http, admin)
    domain = server.new_domain()
    inbox = api.post("/v1/inboxes", {"address": f"agent@{domain}"}).json["address"]
    reader = api.post("/v1/api-keys", {"name": "reader", "scopes": ["messages:read"],
                                       "inboxes": [inbox]}).json
    sender = api.post("/v1/api-keys", {"name": "sender", "scopes": ["messages:send"],
                                       "domains": [domain]}).json
    elsewhere = api.post("/v1/api-keys", {"name": "other", "scopes": ["admin"],
                                          "domains": [server.new_domain()]}).json

    assert imap_ok(server, inbox, reader["key"]) and pop3_ok(server, inbox, reader["key"])
    assert submit_ok(server, inbox, sender["key"])
    assert not submit_ok(server, inbox, reader["key"])  # no messages:send
    assert not imap_ok(server, inbox, sender["key"])  # no messages:read
    assert not imap_ok(server, inbox, elsewhere["key"])  # another domain
    assert len(server.inbox(inbox)) == 1

    rotated = api.post(f"/v1/api-keys/{reader['id']}/rotate").json["key"]
    assert not imap_ok(server, inbox, reader["key"]) and imap_ok(server, inbox, rotated)
    assert api.delete(f"/v1/api-keys/{reader['id']}").status == 200
    assert not imap_ok(server, inbox, rotated) and not pop3_ok(server, inbox, rotated)
