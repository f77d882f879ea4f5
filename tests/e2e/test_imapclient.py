"""An app's view of IMAP: imapclient (PyPI) reading, filing and flagging mail over IMAPS."""

from __future__ import annotations

import smtplib
import ssl
import threading

from imapclient import IMAPClient

from tests.harness import Mailsuite

PASSWORD = "correct horse"


def client_for(server: Mailsuite, address: str) -> IMAPClient:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client = IMAPClient(server.imaps[0], port=server.imaps[1], ssl=True, ssl_context=context,
                        timeout=30)
    client.login(address, PASSWORD)
    return client


def deliver(server: Mailsuite, address: str, subject: str, body: str = "hello") -> bytes:
    raw = (f"From: Alice <alice@spf-pass.test>\r\nTo: {address}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{subject}@spf-pass.test>\r\n\r\n{body}\r\n").encode()
    with smtplib.SMTP(*server.mx) as smtp:
        assert smtp.sendmail("alice@spf-pass.test", [address], raw) == {}
    return raw


def test_an_app_reads_new_mail_files_it_and_flags_it(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account(password=PASSWORD)
    sent = deliver(mailsuite, address, "invoice-42", "Please pay 42 EUR")
    deliver(mailsuite, address, "newsletter")
    with client_for(mailsuite, address) as client:
        folders = {name: flags for flags, _, name in client.list_folders()}
        assert b"\\Archive" in folders["Archive"] and b"\\Sent" in folders["Sent"]
        client.select_folder("INBOX")
        unseen = client.search(["UNSEEN"])
        assert len(unseen) == 2
        [invoice] = client.search(["SUBJECT", "invoice-42"])
        data = client.fetch([invoice], ["ENVELOPE", "BODY.PEEK[]", "FLAGS"])[invoice]
        assert data[b"ENVELOPE"].subject == b"invoice-42"
        assert data[b"ENVELOPE"].from_[0].mailbox == b"alice"
        assert data[b"BODY[]"].endswith(sent)  # byte-exact after our trace fields
        assert b"\\Seen" not in data[b"FLAGS"]
        client.add_flags([invoice], [b"\\Flagged", b"$Invoice"])
        client.move([invoice], "Archive")
        assert client.search(["ALL"]) != [invoice]
        client.select_folder("Archive")
        [archived] = client.search(["FLAGGED"])
        assert set(client.get_flags([archived])[archived]) >= {b"\\Flagged", b"$Invoice"}
    assert [m.raw for m in mailsuite.store.messages(address, "Archive")][0].endswith(sent)


def test_an_app_waiting_in_idle_is_woken_by_new_mail(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account(password=PASSWORD)
    with client_for(mailsuite, address) as client:
        client.select_folder("INBOX")
        client.idle()
        sender = threading.Timer(0.2, deliver, (mailsuite, address, "wake-up"))
        sender.start()
        responses = client.idle_check(timeout=10)
        client.idle_done()
        sender.join()
    assert (1, b"EXISTS") in responses, responses
