"""IMAP IDLE (RFC 2177) against the running service: the continuation, DONE, and how fast an
idling client hears of new mail and of other sessions' changes, also when the change is made by
another mailsuite process on the same PostgreSQL database.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite
from tests.imap.test_imap_session import (
    SENDER,
    Wire,
    make_message,
    session,
)

# Notifications are meant to arrive in well under 100 ms; the bound leaves room for a loaded
# test machine without hiding a poll-based implementation (which would show seconds).
MAX_LATENCY = 1.0


def start_idle(client: Wire) -> str:
    tag = client.tag()
    client.send(f"{tag} IDLE\r\n")
    line = client.read()
    assert line.startswith(b"+ "), line
    return tag


def stop_idle(client: Wire, tag: str, done: str = "DONE") -> list[bytes]:
    """End IDLE; the untagged responses that came before the tagged OK."""
    client.send(done + "\r\n")
    reply = client.finish(tag)
    assert reply.status == "OK", reply
    return reply.untagged


def wait_line(client: Wire, want: Callable[[bytes], bool],
              since: float, timeout: float = 5.0) -> tuple[bytes, float]:
    """The first response that satisfies `want`, and its delay after `since` (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        line = client.read(max(0.01, deadline - time.monotonic()))
        if want(line):
            return line, time.monotonic() - since


class MX:
    """One SMTP connection to the MX, set up ahead so a delivery measures only the delivery."""

    def __init__(self, server: Mailsuite) -> None:
        self.smtp = smtplib.SMTP(*server.mx, timeout=30)
        self.smtp.ehlo("client.test")

    def send(self, address: str, raw: bytes) -> float:
        """Deliver; the monotonic time the MX accepted the message."""
        assert self.smtp.sendmail(SENDER, [address], raw) == {}
        return time.monotonic()

    def close(self) -> None:
        self.smtp.quit()


@pytest.fixture
def mx(mailsuite: Mailsuite) -> Iterator[MX]:
    client = MX(mailsuite)
    yield client
    client.close()


def test_idle_answers_with_a_continuation_and_done_ends_it_with_tagged_ok(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        tag = start_idle(client)  # also allowed with no mailbox selected
        assert stop_idle(client, tag) == []
        client.ok("SELECT INBOX")
        tag = start_idle(client)
        assert client.quiet(0.3)  # nothing to report, nothing sent
        assert stop_idle(client, tag, "done") == []  # "DONE" is case-insensitive
        client.ok("NOOP")


def test_mail_delivered_through_the_mx_shows_as_exists_within_a_second(
        mailsuite: Mailsuite, mx: MX) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("SELECT INBOX")
        tag = start_idle(client)
        latencies = []
        for count in range(1, 4):
            accepted = mx.send(address, make_message(f"news {count}"))
            line, latency = wait_line(client, lambda line: line.endswith(b" EXISTS"),
                                      since=accepted)
            assert line == f"* {count} EXISTS".encode()
            latencies.append(latency)
        print(f"IDLE EXISTS latencies after the MX's 250: {latencies}")
        assert max(latencies) < MAX_LATENCY, latencies
        stop_idle(client, tag)
        assert len(client.fetch("1:*", "UID")) == 3


def test_another_sessions_append_copy_store_and_expunge_wake_the_idler(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as idler, session(mailsuite, address) as other:
        idler.append("INBOX", make_message("already there"))
        other.append("Archive", make_message("to be copied"))
        idler.ok("SELECT INBOX")
        tag = start_idle(idler)

        def expect(line: bytes, since: float) -> None:
            got, latency = wait_line(idler, lambda _: True, since)
            assert got == line, got
            assert latency < MAX_LATENCY, latency

        start = time.monotonic()
        other.append("INBOX", make_message("appended"))
        expect(b"* 2 EXISTS", start)

        other.ok("SELECT Archive")
        start = time.monotonic()
        other.ok("COPY 1 INBOX")
        expect(b"* 3 EXISTS", start)

        other.ok("SELECT INBOX")
        start = time.monotonic()
        other.ok("STORE 1 +FLAGS.SILENT (\\Flagged)")
        got, latency = wait_line(idler, lambda _: True, start)
        assert got.startswith(b"* 1 FETCH (") and b"\\Flagged" in got, got
        assert latency < MAX_LATENCY, latency

        start = time.monotonic()
        other.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        other.ok("EXPUNGE")
        got, _ = wait_line(idler, lambda line: line.endswith(b" EXPUNGE"), start)
        assert got == b"* 2 EXPUNGE"  # during IDLE, EXPUNGE may be sent (RFC 2177)
        assert time.monotonic() - start < MAX_LATENCY + 0.5
        stop_idle(idler, tag)
        assert len(idler.fetch("1:*", "UID")) == 2


def test_only_done_ends_idle_and_other_lines_get_bad(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as idler, session(mailsuite, address) as other:
        idler.ok("SELECT INBOX")
        tag = start_idle(idler)
        idler.send("x NOOP\r\n")
        assert idler.read().startswith(b"* BAD"), "a command during IDLE was not refused"
        idler.send("DONE please\r\n")
        assert idler.read().startswith(b"* BAD")
        # Still idling: news keeps coming.
        start = time.monotonic()
        other.append("INBOX", make_message())
        got, latency = wait_line(idler, lambda _: True, start)
        assert got == b"* 1 EXISTS" and latency < MAX_LATENCY, (got, latency)
        assert stop_idle(idler, tag) == []
        assert idler.command("NOOP").status == "OK"


def test_idle_sees_changes_made_by_another_mailsuite_process_on_the_same_postgresql(
        new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
        tmp_path: Path) -> None:
    db_url = new_db_url("postgresql")
    first = Mailsuite(tmp_path / "first", db_url, dns_server.address)
    second = Mailsuite(tmp_path / "second", db_url, dns_server.address)
    try:
        first.start()
        second.start()
        address = first.new_account()
        mx = MX(second)
        with session(first, address) as idler, session(second, address) as other:
            idler.ok("SELECT INBOX")
            tag = start_idle(idler)

            accepted = mx.send(address, make_message("via the other process"))
            got, latency = wait_line(idler, lambda line: line.endswith(b" EXISTS"), accepted)
            assert got == b"* 1 EXISTS"
            assert latency < MAX_LATENCY, latency

            other.ok("SELECT INBOX")
            start = time.monotonic()
            other.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
            got, latency = wait_line(idler, lambda _: True, start)
            assert got.startswith(b"* 1 FETCH (") and b"\\Seen" in got, got
            assert latency < MAX_LATENCY, latency
            stop_idle(idler, tag)
        mx.close()
    finally:
        second.stop()
        first.stop()
