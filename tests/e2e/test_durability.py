"""A 250 means the message is committed: it survives SIGTERM and SIGKILL; a failed commit is 451."""

from __future__ import annotations

import signal
import smtplib
from collections.abc import Callable

import pytest
from sqlalchemy import select, text

from mailsuite.store import schema as t
from tests.harness import Mailsuite

SENDER = "sender@spf-pass.test"


def send(server: Mailsuite, recipient: str, subject: str) -> bytes:
    raw = f"Subject: {subject}\r\nMessage-ID: <{subject}@client.test>\r\n\r\n{subject}\r\n"
    with smtplib.SMTP(*server.mx, timeout=30) as smtp:
        assert smtp.sendmail(SENDER, [recipient], raw.encode()) == {}
    return subject.encode()


def uids_and_subjects(server: Mailsuite, address: str) -> list[tuple[int, bytes]]:
    return [(m.uid, _subject(m.raw)) for m in server.store.messages(address)]


def _subject(raw: bytes) -> bytes:
    for line in raw.split(b"\r\n"):
        if line.startswith(b"Subject: "):
            return line[len(b"Subject: "):]
    return b""


def inbox_uidnext(server: Mailsuite, address: str) -> int:
    account = server.store.account_get(address)
    assert account is not None
    with server.store.db.read() as conn:
        return conn.scalar(select(t.mailboxes.c.uidnext).where(
            (t.mailboxes.c.account_id == account.id) & (t.mailboxes.c.name == "INBOX")))


def test_message_accepted_before_sigterm_is_there_after_restart_and_uids_continue(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite()
    address = server.new_account()
    first = send(server, address, "before-sigterm")
    server.stop(signal.SIGTERM)

    server.start()
    assert uids_and_subjects(server, address) == [(1, first)]
    second = send(server, address, "after-restart")
    assert uids_and_subjects(server, address) == [(1, first), (2, second)]


def test_message_answered_250_survives_sigkill_right_after(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite()
    address = server.new_account()
    raw = b"Subject: before-sigkill\r\nMessage-ID: <k@client.test>\r\n\r\nkill me now\r\n"
    smtp = smtplib.SMTP(*server.mx, timeout=30)
    try:
        assert smtp.sendmail(SENDER, [address], raw) == {}  # the 250 has been read
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)  # before QUIT, before anything else
        server.process.wait(15)
    finally:
        smtp.close()
    server.stop()  # forget the dead process and the test's store connections

    server.start()
    stored = server.store.messages(address)
    assert [m.uid for m in stored] == [1]
    assert stored[0].raw.endswith(raw)
    second = send(server, address, "after-sigkill")
    assert uids_and_subjects(server, address) == [(1, b"before-sigkill"), (2, second)]


def test_failed_commit_answers_451_4_3_0_stores_nothing_and_the_server_recovers(
        backend: str, start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite()
    address = server.new_account()
    if backend == "sqlite":
        refuse = ("CREATE TRIGGER refuse BEFORE INSERT ON messages "
                  "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        allow = "DROP TRIGGER refuse"
    else:
        refuse = "ALTER TABLE messages ADD CONSTRAINT refuse CHECK (size < 0) NOT VALID"
        allow = "ALTER TABLE messages DROP CONSTRAINT refuse"
    blobs_before = server.store.blob_count()
    uidnext_before = inbox_uidnext(server, address)
    received_before = len(server.store.events(kind="received", limit=100000))
    with server.store.db.write() as conn:
        conn.execute(text(refuse))

    raw = b"Subject: refused\r\nMessage-ID: <r@client.test>\r\n\r\nnot stored\r\n"
    with smtplib.SMTP(*server.mx, timeout=30) as smtp, \
            pytest.raises(smtplib.SMTPDataError) as refused:
        smtp.sendmail(SENDER, [address], raw)
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error.startswith(b"4.3.0"), refused.value.smtp_error
    assert server.store.blob_count() == blobs_before
    assert server.store.messages(address) == []
    assert inbox_uidnext(server, address) == uidnext_before
    assert len(server.store.events(kind="received", limit=100000)) == received_before

    with server.store.db.write() as conn:
        conn.execute(text(allow))
    assert server.process is not None and server.process.poll() is None
    accepted = send(server, address, "accepted-after-recovery")
    assert uids_and_subjects(server, address) == [(uidnext_before, accepted)]
    assert server.store.blob_count() == blobs_before + 1
