"""RCPT policy of the inbound MX (RFC 5321 3.6, 4.2.2): local domains only, decided at RCPT."""

from __future__ import annotations

import smtplib
import time

import pytest

from tests.harness import Mailsuite
from tests.smtp.smtp_client import RawSMTP


def open_transaction(mailsuite: Mailsuite) -> RawSMTP:
    client = RawSMTP(mailsuite.mx)
    assert client.greeting()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    assert client.cmd("MAIL FROM:<sender@spf-pass.test>")[0] == 250
    return client


def test_rcpt_unknown_local_user_gets_550_5_1_1_at_rcpt_time(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    client = open_transaction(mailsuite)
    code, text = client.cmd(f"RCPT TO:<nobody@{domain}>")
    assert (code, text.split()[0]) == (550, "5.1.1")
    client.close()


@pytest.mark.parametrize("path", [
    "<victim@remote.example>",
    '<"victim@remote.example">',
    "<victim%remote.example@{local}>",
    "<remote.example!victim@{local}>",
    "<@{local}:victim@remote.example>",
    "<@{local},@{local}:victim@remote.example>",
    "<victim@[127.0.0.1]>",
    "<victim@[IPv6:::1]>",
    '<"victim@remote.example"@{local}>',
    "<victim@remote.example.>",
])
def test_rcpt_never_relays_whatever_the_address_trick(mailsuite: Mailsuite, path: str) -> None:
    domain = mailsuite.new_domain()
    client = open_transaction(mailsuite)
    code, text = client.cmd(f"RCPT TO:{path.format(local=domain)}")
    # Either refused as relaying or, for our own domain, as an unknown local user; never 250.
    assert code >= 500, (path, code, text)
    assert text.split()[0] in ("5.7.1", "5.1.1", "5.1.3"), text
    assert client.cmd("DATA")[0] == 554
    client.close()


def test_rcpt_to_foreign_domain_is_554_5_7_1_relay_denied(mailsuite: Mailsuite) -> None:
    client = open_transaction(mailsuite)
    code, text = client.cmd("RCPT TO:<someone@elsewhere.example>")
    assert code == 554 and text.startswith("5.7.1") and "Relay access denied" in text
    # The event is written after the reply, off the session's critical path.
    deadline = time.monotonic() + 5
    while True:
        rejected = [e for e in mailsuite.store.events(kind="rejected", limit=100000)
                    if e.detail.get("recipient") == "someone@elsewhere.example"]
        if rejected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rejected and rejected[-1].detail["reason"] == "relay denied"


def test_alias_delivers_to_its_accounts_once_each(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    first, second = mailsuite.new_account(domain), mailsuite.new_account(domain)
    mailsuite.store.alias_add(f"team@{domain}", [first, second])
    mailsuite.store.alias_add(f"lead@{domain}", [f"team@{domain}"])
    with smtplib.SMTP(*mailsuite.mx) as smtp:
        refused = smtp.sendmail("a@spf-pass.test", [f"lead@{domain}", f"team@{domain}", first],
                                b"Subject: alias\r\n\r\nto the team\r\n")
    assert refused == {}
    assert len(mailsuite.inbox(first)) == 1
    assert len(mailsuite.inbox(second)) == 1


def test_catch_all_takes_unknown_local_parts_but_not_other_domains(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    catcher = mailsuite.new_account(domain)
    mailsuite.store.alias_add(f"@{domain}", [catcher])
    with smtplib.SMTP(*mailsuite.mx) as smtp:
        smtp.sendmail("a@spf-pass.test", [f"anything-at-all@{domain}"], b"Subject: c\r\n\r\nx\r\n")
    assert len(mailsuite.inbox(catcher)) == 1


def test_alias_to_external_address_is_accepted_and_queued_for_forwarding(
        mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    mailsuite.store.alias_add(f"fwd@{domain}", ["someone@elsewhere.example"])
    client = open_transaction(mailsuite)
    code, _ = client.cmd(f"RCPT TO:<fwd@{domain}>")
    assert code == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: forward me\r\n\r\nbody\r\n.\r\n")
    code, text = client.reply()
    assert code == 250
    queue_id = text.split()[-1]
    # Queued in the same commit as the 250, with its envelope sender rewritten (SRS).
    [queued] = [e.detail for e in mailsuite.store.events("queued", limit=100000)
                if e.detail["queue_id"] == queue_id]
    assert queued["kind"] == "forward" and queued["sender"].startswith("SRS0=")
    assert queued["recipients"] == ["someone@elsewhere.example"]
    client.close()


def test_more_than_100_recipients_get_452_4_5_3(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    target = mailsuite.new_account(domain)
    mailsuite.store.alias_add(f"@{domain}", [target])
    client = open_transaction(mailsuite)
    for i in range(100):
        assert client.cmd(f"RCPT TO:<r{i}@{domain}>")[0] == 250
    code, text = client.cmd(f"RCPT TO:<r100@{domain}>")
    assert (code, text.split()[0]) == (452, "4.5.3")
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: many\r\n\r\nbody\r\n.\r\n")
    assert client.reply()[0] == 250
    assert len(mailsuite.inbox(target)) == 1  # one copy for 100 addresses of one account
    client.close()


def test_recipient_address_case_does_not_matter(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with smtplib.SMTP(*mailsuite.mx) as smtp:
        smtp.sendmail("a@spf-pass.test", [address.upper()], b"Subject: case\r\n\r\nx\r\n")
    assert len(mailsuite.inbox(address)) == 1
