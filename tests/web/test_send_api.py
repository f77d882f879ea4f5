"""Sending through the API: the shared pipeline, local delivery, the Sent copy an IMAP client
sees, and the refusals that keep header and envelope injection out."""

from __future__ import annotations

import base64
import email
import imaplib
import ssl
from datetime import UTC, datetime
from email import policy

import pytest
from sqlalchemy import insert

from mailsuite.store import schema as t
from tests.harness import Mailsuite
from tests.web.client import ApiClient

PASSWORD = "correct horse"


@pytest.fixture
def pair(mailsuite: Mailsuite, api: ApiClient) -> tuple[ApiClient, str, str]:
    """A key that may send for a new inbox, that inbox, and another local inbox."""
    domain = mailsuite.new_domain()
    sender, other = mailsuite.new_account(domain), mailsuite.new_account(domain)
    key = api.post("/v1/api-keys", {"name": "sender", "scopes": ["messages:send"],
                                    "inboxes": [sender]}).json["key"]
    return api.with_key(key), sender, other


def imap_messages(server: Mailsuite, address: str, folder: str) -> list[tuple[bytes, bytes]]:
    """(flags, raw) of every message in a folder, over IMAP with STARTTLS."""
    client = imaplib.IMAP4(*server.imap)
    client.starttls(ssl_context=ssl._create_unverified_context())
    client.login(address, PASSWORD)
    status, count = client.select(folder, readonly=True)
    assert status == "OK"
    if count == [b"0"]:
        client.logout()
        return []
    status, data = client.fetch("1:*", "(FLAGS BODY.PEEK[])")
    client.logout()
    return [(meta.split(b" BODY[]")[0], raw) for meta, raw in
            (part for part in data if isinstance(part, tuple))]


def test_an_api_send_to_a_local_inbox_arrives_and_lands_in_sent(
        pair: tuple[ApiClient, str, str], mailsuite: Mailsuite) -> None:
    client, sender, other = pair
    reply = client.post(f"/v1/inboxes/{sender}/messages/send", {
        "to": [f"Other Person <{other}>"], "subject": "Grüße from the API",
        "text": "Hello in plain text", "html": "<p>Hello in <b>HTML</b></p>",
        "attachments": [{"filename": "notes.txt", "content_type": "text/plain",
                         "content": base64.b64encode(b"attached bytes").decode()}],
        "headers": {"X-Ticket": "4711"}})
    assert reply.status == 202, reply.body
    result = reply.json
    assert result["status"] == "queued"
    assert result["recipients"] == [{"address": other, "status": "delivered"}]

    [(flags, received)] = imap_messages(mailsuite, other, "INBOX")
    assert b"\\Seen" not in flags
    message = email.message_from_bytes(received, policy=policy.default)
    assert str(message["Subject"]) == "Grüße from the API"
    assert message["From"].addresses[0].addr_spec == sender
    assert message["Message-ID"] == f"<{result['message_id']}>"
    assert message["X-Ticket"] == "4711"
    assert message["Received"].startswith("by mx.mailsuite.test (mailsuite) with HTTP id")
    assert message.get_body(("html",)).get_content().strip() == "<p>Hello in <b>HTML</b></p>"
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "notes.txt"
    assert attachment.get_payload(decode=True) == b"attached bytes"

    # The Sent copy: \Seen, the same message as sent (without our trace fields).
    [(sent_flags, sent)] = imap_messages(mailsuite, sender, "Sent")
    assert b"\\Seen" in sent_flags
    assert received.endswith(sent)


def test_unknown_and_suppressed_recipients_are_422_and_nothing_is_stored(
        pair: tuple[ApiClient, str, str], mailsuite: Mailsuite) -> None:
    client, sender, other = pair
    domain = other.rpartition("@")[2]
    reply = client.post(f"/v1/inboxes/{sender}/messages/send",
                        {"to": [other, f"ghost@{domain}"], "text": "x"})
    assert reply.status == 422 and reply.error_code == "recipient_unknown"
    assert f"ghost@{domain}" in reply.json["error"]["message"]
    with mailsuite.store.db.write() as conn:
        conn.execute(insert(t.suppressions).values(address="gone@remote.test",
                                                   reason="550 5.1.1 gone",
                                                   created_at=datetime.now(UTC)))
    reply = client.post(f"/v1/inboxes/{sender}/messages/send",
                        {"to": other, "cc": "gone@remote.test", "text": "x"})
    assert reply.status == 422 and reply.error_code == "recipient_suppressed"
    assert "gone@remote.test" in reply.json["error"]["message"]
    assert imap_messages(mailsuite, other, "INBOX") == []
    assert imap_messages(mailsuite, sender, "Sent") == []


@pytest.mark.parametrize(("body", "param"), [
    ({"to": "victim@remote.test", "subject": "hi\r\nBcc: all@remote.test", "text": "x"},
     "subject"),
    ({"to": "a@remote.test)<b@remote.test>", "text": "x"}, "to"),
    ({"to": ["ok@remote.test", "x@remote.test\r\nRCPT TO:<y@remote.test>"], "text": "x"},
     "to[1]"),
    ({"to": "ceo@bank.test <me@remote.test>", "text": "x"}, "to"),
    ({"to": "a@remote.test", "text": "x", "headers": {"Bcc": "all@remote.test"}},
     "headers.Bcc"),
    ({"to": "a@remote.test", "text": "x", "headers": {"X-Ok": "a\r\nBcc: b@remote.test"}},
     "headers.X-Ok"),
    ({"to": "a@remote.test", "text": "x", "attachments": [
        {"filename": "a.bin", "content": "not base64!!"}]}, "attachments[0].content"),
    ({"to": "a@remote.test", "text": "x", "attachments": [
        {"filename": "a\r\nb.bin", "content": "eA=="}]}, "attachments[0].filename"),
    ({"to": "a@remote.test"}, "text"),
    ({"to": [], "text": "x"}, "to"),
    ({"to": "a@remote.test", "text": "x", "from": "ceo@bank.test"}, "from"),
])
def test_injection_and_bad_input_get_400_naming_the_field_and_send_nothing(
        pair: tuple[ApiClient, str, str], mailsuite: Mailsuite, body: dict, param: str) -> None:
    client, sender, _ = pair
    reply = client.post(f"/v1/inboxes/{sender}/messages/send", body)
    assert reply.status == 400, reply.body
    assert reply.json["error"]["param"] == param
    assert imap_messages(mailsuite, sender, "Sent") == []


def test_sending_needs_the_scope_and_the_inbox_in_reach(
        pair: tuple[ApiClient, str, str], api: ApiClient, mailsuite: Mailsuite) -> None:
    client, sender, other = pair
    # The key reaches its own inbox only; another inbox is 404 (existence is not revealed).
    reply = client.post(f"/v1/inboxes/{other}/messages/send", {"to": sender, "text": "x"})
    assert reply.status == 404
    reader = api.with_key(api.post("/v1/api-keys", {
        "name": "r", "scopes": ["messages:read"], "inboxes": [sender]}).json["key"])
    reply = reader.post(f"/v1/inboxes/{sender}/messages/send", {"to": other, "text": "x"})
    assert reply.status == 403
