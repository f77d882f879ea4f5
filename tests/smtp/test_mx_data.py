"""What the MX does with message data (RFC 5321 3.3, 4.1.1.4, 4.5.2, 4.4, 2.3.8)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from tests.dnsserver import DNSServerHandle
from tests.harness import TEST_HOSTNAME, Mailsuite
from tests.smtp.smtp_client import RawSMTP

SENDER = "sender@spf-pass.test"
LIMITS = {"max_message_size": 100_000, "max_received_headers": 5}


@pytest.fixture(scope="module")
def limited(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """One mailsuite with small limits for this module's limit tests (they do not interact)."""
    server = Mailsuite(tmp_path_factory.mktemp(f"limited-{backend}"), new_db_url(backend),
                       dns_server.address, {"smtp": LIMITS}).start()
    yield server
    server.stop()


def session(server: Mailsuite) -> RawSMTP:
    client = RawSMTP(server.mx)
    assert client.greeting()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    return client


def open_data(client: RawSMTP, recipients: list[str], sender: str = SENDER,
              params: str = "") -> None:
    """MAIL, RCPT... and DATA up to the 354, on an EHLO'd session."""
    assert client.cmd(f"MAIL FROM:<{sender}>{params}")[0] == 250
    for rcpt in recipients:
        assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354


def dot_stuff(message: bytes) -> bytes:
    """The message as a client puts it on the wire, end-of-data included (RFC 5321 4.5.2)."""
    return re.sub(rb"(?m)^\.", b"..", message) + b".\r\n"


def send_message(server: Mailsuite, recipients: list[str], message: bytes,
                 params: str = " BODY=8BITMIME") -> tuple[int, str]:
    """One transaction on a new session; the reply to the end of data."""
    client = session(server)
    open_data(client, recipients, params=params)
    client.send(dot_stuff(message))
    reply = client.reply()
    client.close()
    return reply


def send_raw_data(client: RawSMTP, recipients: list[str], wire: bytes) -> tuple[int, str]:
    """DATA whose bytes go out exactly as given (no stuffing, no end-of-data added)."""
    open_data(client, recipients)
    client.send(wire)
    return client.reply()


def trace_and_message(stored: bytes) -> tuple[list[bytes], bytes]:
    """Split off the header fields the server prepends: ([fields], the message as sent)."""
    fields: list[bytes] = []
    rest = stored
    for name in (b"Return-Path:", b"Received:", b"Authentication-Results:"):
        assert rest.startswith(name), (name, stored[:400])
        end = rest.index(b"\r\n") + 2
        while rest[end:end + 1] in (b" ", b"\t"):  # folded continuation lines
            end = rest.index(b"\r\n", end) + 2
        fields.append(rest[:end])
        rest = rest[end:]
    return fields, rest


def assert_stored_unchanged(stored: bytes, message: bytes) -> list[bytes]:
    fields, rest = trace_and_message(stored)
    assert rest == message
    return fields


# --- the stored bytes ----------------------------------------------------------------------
def test_stored_message_is_the_sent_bytes_after_our_trace_fields(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    message = (
        f"From: Sender <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: exact bytes\r\n"
        "Message-ID: <exact@spf-pass.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        "X-Odd-Spacing:   kept  as\t is \r\n"
        "\r\n"
        "Grüße aus Köln — 日本語のテキスト\r\n"
    ).encode() + b"L" * 998 + b"\r\n" + (
        b".a line that starts with a dot\r\n"
        b"..and one with two\r\n"
        b".\r\n"  # a line that is only a dot: stuffed to "..", not the end of data
        b"\r\n"
        b"   trailing spaces   \r\n"
        b"last line\r\n"
    )
    wire = dot_stuff(message)
    assert b"\r\n..a line that starts" in wire and b"\r\n...and one" in wire
    assert send_message(mailsuite, [rcpt], message)[0] == 250
    [stored] = mailsuite.inbox(rcpt)
    return_path, received, auth_results = assert_stored_unchanged(stored, message)
    assert return_path == f"Return-Path: <{SENDER}>\r\n".encode()
    assert received.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert f"by {TEST_HOSTNAME} (mailsuite) with ESMTP id ".encode() in received
    assert f"\tfor <{rcpt}>;".encode() in received
    assert auth_results.startswith(f"Authentication-Results: {TEST_HOSTNAME};".encode())


def test_one_message_to_two_accounts_is_stored_once_with_ascending_uids(
        mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    first, second = mailsuite.new_account(domain), mailsuite.new_account(domain)
    blobs_before = mailsuite.store.blob_count()
    messages = [f"Subject: number {n}\r\n\r\nbody {n}\r\n".encode() for n in (1, 2, 3)]
    for message in messages:
        assert send_message(mailsuite, [first, second], message)[0] == 250
    assert mailsuite.store.blob_count() - blobs_before == 3
    in_first, in_second = mailsuite.store.messages(first), mailsuite.store.messages(second)
    assert [m.uid for m in in_first] == [1, 2, 3]
    assert [m.uid for m in in_second] == [1, 2, 3]
    for one, other, message in zip(in_first, in_second, messages, strict=True):
        assert one.blob_id == other.blob_id
        assert one.raw == other.raw
        _, received, _ = assert_stored_unchanged(one.raw, message)
        assert b"\tfor <" not in received  # two recipients: Received names none


# --- line ends (RFC 5321 2.3.8) and smuggling ----------------------------------------------
@pytest.mark.parametrize("bad", [b"\n", b"\r"], ids=["bare-LF", "bare-CR"])
def test_bare_line_end_in_data_is_refused_and_nothing_is_stored(
        mailsuite: Mailsuite, bad: bytes) -> None:
    rcpt = mailsuite.new_account()
    blobs_before = mailsuite.store.blob_count()
    client = session(mailsuite)
    wire = b"Subject: bare\r\n\r\nline one" + bad + b"line two\r\n.\r\n"
    code, text = send_raw_data(client, [rcpt], wire)
    assert (code, text.split(" ", 1)[0]) == (550, "5.6.0"), text
    assert mailsuite.store.blob_count() == blobs_before
    assert mailsuite.inbox(rcpt) == []
    # The session goes on: a clean message in the same session is accepted.
    code, text = send_raw_data(client, [rcpt], b"Subject: clean\r\n\r\nfine\r\n.\r\n")
    assert code == 250, text
    client.close()
    [stored] = mailsuite.inbox(rcpt)
    assert_stored_unchanged(stored, b"Subject: clean\r\n\r\nfine\r\n")


@pytest.mark.parametrize("fake_end", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n", b"\r\n.\r"],
                         ids=["LF.CRLF", "CRLF.LF", "LF.LF", "CR.CRLF", "CRLF.CR"])
def test_smtp_smuggling_attempt_is_refused_whole(mailsuite: Mailsuite, fake_end: bytes) -> None:
    domain = mailsuite.new_domain()
    rcpt, victim = mailsuite.new_account(domain), mailsuite.new_account(domain)
    blobs_before = mailsuite.store.blob_count()
    client = session(mailsuite)
    wire = (b"Subject: outer\r\n\r\nouter body" + fake_end
            + f"MAIL FROM:<evil@spf-pass.test>\r\nRCPT TO:<{victim}>\r\nDATA\r\n".encode()
            + b"Subject: smuggled\r\n\r\nsmuggled\r\n" + b"\r\n.\r\n")
    code, text = send_raw_data(client, [rcpt], wire)
    assert 500 <= code < 600, (code, text)
    # Exactly one reply for all of it: the smuggled commands were never run as commands.
    assert client.cmd("HELP")[0] == 214
    client.close()
    assert mailsuite.store.blob_count() == blobs_before
    assert mailsuite.inbox(rcpt) == []
    assert mailsuite.inbox(victim) == []


# --- limits --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [100_001, 400_000], ids=["just-over", "far-over"])
def test_message_over_the_size_limit_is_refused_after_end_of_data(
        limited: Mailsuite, size: int) -> None:
    rcpt = limited.new_account()
    blobs_before = limited.store.blob_count()
    header = b"Subject: big\r\n\r\n"
    line = b"y" * 98 + b"\r\n"
    body = line * ((size - len(header)) // len(line) + 1)
    client = session(limited)
    open_data(client, [rcpt])  # no SIZE= declared, so only the data itself can tell
    client.send(header + body + b".\r\n")
    code, text = client.reply()
    assert (code, text.split(" ", 1)[0]) == (552, "5.3.4"), text
    assert limited.inbox(rcpt) == []
    assert limited.store.blob_count() == blobs_before
    # The session goes on, and a message below the limit is accepted.
    below = header + line * 900  # 90 kB
    code, text = send_raw_data(client, [rcpt], below + b".\r\n")
    assert code == 250, text
    client.close()
    [stored] = limited.inbox(rcpt)
    assert_stored_unchanged(stored, below)


def test_message_with_max_received_fields_is_refused_as_a_loop(limited: Mailsuite) -> None:
    server = limited
    rcpt = server.new_account()
    blobs_before = server.store.blob_count()

    def hops(count: int) -> bytes:
        return b"".join(f"Received: from hop{n}.test by hop{n + 1}.test; "
                        f"Mon, 1 Jan 2024 00:00:0{n} +0000\r\n".encode() for n in range(count))

    code, text = send_message(server, [rcpt], hops(5) + b"Subject: loop\r\n\r\nround\r\n")
    assert (code, text.split(" ", 1)[0]) == (554, "5.4.6"), text
    code, text = send_message(server, [rcpt], hops(7) + b"Subject: loop\r\n\r\nround\r\n")
    assert (code, text.split(" ", 1)[0]) == (554, "5.4.6"), text
    assert server.inbox(rcpt) == []
    assert server.store.blob_count() == blobs_before
    below = hops(4) + b"Subject: four hops\r\n\r\nstill fine\r\n"
    assert send_message(server, [rcpt], below)[0] == 250
    [stored] = server.inbox(rcpt)
    assert_stored_unchanged(stored, below)


# --- degenerate messages -------------------------------------------------------------------
@pytest.mark.parametrize("message", [b"", b"Subject: headers only\r\nX-Empty: yes\r\n"],
                         ids=["empty", "headers-only"])
def test_empty_and_header_only_messages_are_stored(mailsuite: Mailsuite, message: bytes) -> None:
    rcpt = mailsuite.new_account()
    assert send_message(mailsuite, [rcpt], message)[0] == 250
    [stored] = mailsuite.inbox(rcpt)
    assert_stored_unchanged(stored, message)
