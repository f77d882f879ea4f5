"""Hostile IMAP clients against the running service: literals before login (RFC 7888), a
client that stops reading a big FETCH over TLS and then goes away, and mailbox names that are
no canonical modified UTF-7 or that look like paths or other namespaces.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import pytest

from mailsuite.imap.utf7 import decode_mailbox, encode_mailbox
from tests.harness import Mailsuite
from tests.imap.test_imap_session import Wire, quote, session


def log_mark(server: Mailsuite) -> int:
    return server.log_path.stat().st_size


def log_since(server: Mailsuite, mark: int) -> str:
    with open(server.log_path, "rb") as handle:
        handle.seek(mark)
        return handle.read().decode("utf-8", "replace")


# =========================================================================== literals before login
@pytest.mark.parametrize("command", ["a APPEND INBOX {20000000}", "a LOGIN {8193}",
                                     'a LOGIN "user" {9000}'])
def test_a_big_synchronizing_literal_before_login_is_bad_without_continuation(
        mailsuite: Mailsuite, command: str) -> None:
    with session(mailsuite) as client:
        client.send(command + "\r\n")
        line = client.read()
        assert line.startswith(b"a BAD"), line
        assert client.quiet(0.5), "a continuation or more came"
        client.ok("NOOP")  # the session goes on, nothing was buffered


def test_a_big_non_synchronizing_literal_before_login_is_bad_and_closes(
        mailsuite: Mailsuite) -> None:
    for size in (8193, 20_000_000):
        with session(mailsuite) as client:
            client.send(f"a APPEND INBOX {{{size}+}}\r\n".encode() + b"x" * 4096)
            rest = client.read_until_closed(wait=10)
            assert rest is not None, "the connection stayed open"
            assert rest[0].startswith(b"a BAD [TOOBIG]"), rest
            assert rest[1].startswith(b"* BYE"), rest


def test_literals_up_to_8_kb_before_login_are_read(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite) as client:
        user, password = address.encode(), b"correct horse"
        client.send(f"a LOGIN {{{len(user)}}}\r\n".encode())
        assert client.read().startswith(b"+")
        client.send(user + f" {{{len(password)}+}}\r\n".encode() + password + b"\r\n")
        assert client.finish("a").status == "OK"
    with session(mailsuite) as client:
        # 8 KB in all is accepted (and then fails as a login, not as a literal).
        client.send(b"a LOGIN {4096+}\r\n" + b"u" * 4096 + b" {4096+}\r\n" + b"p" * 4096 + b"\r\n")
        reply = client.finish("a", timeout=30)
        assert reply.status == "NO" and reply.code == "AUTHENTICATIONFAILED", reply
    with session(mailsuite) as client:
        # The limit is on the sum of a command's literals.
        client.send(b"a LOGIN {4096+}\r\n" + b"u" * 4096 + b" {4097}\r\n")
        line = client.read()
        assert line.startswith(b"a BAD"), line
        assert client.quiet(0.5)


def test_after_login_big_append_literals_still_get_a_continuation(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        raw = b"Subject: big\r\n\r\n" + b"y" * 100_000 + b"\r\n"
        client.send(f"a APPEND INBOX {{{len(raw)}}}\r\n".encode())
        assert client.read().startswith(b"+")
        client.send(raw + b"\r\n")
        assert client.finish("a").status == "OK"
    assert mailsuite.inbox(address) == [raw]


# =========================================================================== a reader that stalls
@pytest.mark.parametrize("via", ["imaps", "starttls"])
def test_a_stalled_tls_fetch_whose_client_goes_away_leaves_no_traceback(
        start_mailsuite: Callable[..., Mailsuite], via: str) -> None:
    server = start_mailsuite({"imap": {"idle_timeout": 1.5}})
    address = server.new_account()
    raw = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 1000  # 1 MB
    with session(server, address) as client:
        for _ in range(16):
            client.append("INBOX", raw)
    mark = log_mark(server)
    client = Wire(server.imaps if via == "imaps" else server.imap, tls=via == "imaps")
    if via == "starttls":
        client.ok("STARTTLS")
        client.starttls()
    client.login(address)
    client.ok("SELECT INBOX")
    # Ask for 16 MB and read none of it: the server's writes stall on full socket buffers,
    # the idle timeout fires while FETCH waits for the client to read.
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.send(b"f FETCH 1:* BODY.PEEK[]\r\n")
    time.sleep(4)
    # Then the client goes away with unread data (a reset).
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    deadline = time.monotonic() + 10
    while "imap session" not in log_since(server, mark).split("f FETCH")[-1] \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    log = log_since(server, mark)
    assert "imap session" in log, log[-2000:]  # the session ended and was logged
    assert "Traceback" not in log and "Unhandled" not in log, log[-4000:]
    # The server goes on serving.
    with session(server, address) as other:
        other.ok("SELECT INBOX")


# =========================================================================== mailbox names
def test_the_decoder_takes_only_the_canonical_modified_utf7_form() -> None:
    assert encode_mailbox("ÉÉ") == "&AMkAyQ-" and decode_mailbox("&AMkAyQ-") == "ÉÉ"
    assert decode_mailbox("&AMk-&-&AMk-") == "É&É"  # an escaped "&" between shifts is fine
    assert decode_mailbox("&AMk-x&AMk-") == "ÉxÉ"
    for wire in ("&AMk-&AMk-", "a&AMk-&AMk-b", "&AGEAYgBj-", "&AC8-"):
        with pytest.raises(ValueError):
            decode_mailbox(wire)


def mailbox_names(server: Mailsuite, address: str) -> set[str]:
    account = server.store.account_get(address)
    assert account is not None
    return {box.name for box in server.store.mailbox_list(account.id)}


def test_non_canonical_and_reserved_names_are_refused_with_no(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    before = mailbox_names(mailsuite, address)
    with session(mailsuite, address) as client:
        for wire in ("&AMk-&AMk-", "&AGEAYgBj-", "../x", "..", "x/../y", "a/.", "~other",
                     "~", "#news", "#shared/x"):
            reply = client.command(f"CREATE {quote(wire)}")
            assert (reply.status, reply.code) == ("NO", "CANNOT"), (wire, reply)
            reply = client.command(f"RENAME Archive {quote(wire)}")
            assert (reply.status, reply.code) == ("NO", "CANNOT"), (wire, reply)
            for command in (f"SELECT {quote(wire)}", f"EXAMINE {quote(wire)}",
                            f"STATUS {quote(wire)} (MESSAGES)", f"DELETE {quote(wire)}",
                            f"SUBSCRIBE {quote(wire)}", f"RENAME {quote(wire)} Elsewhere",
                            f'APPEND {quote(wire)} {{3+}}\r\nx\r\n'):
                reply = client.command(command)
                assert (reply.status, reply.code) == ("NO", "NONEXISTENT"), (command, reply)
        client.ok("SELECT INBOX")
        client.append("INBOX", b"Subject: x\r\n\r\nx\r\n")
        for wire in ("../x", "~other", "#news"):
            reply = client.command(f"COPY 1 {quote(wire)}")
            assert (reply.status, reply.code) == ("NO", "NONEXISTENT"), (wire, reply)
        # Names that merely contain these characters are ordinary names.
        for wire in ("&AMkAyQ-", "x.y", "..x", "a~b", "a#b", "x/.hidden"):
            client.ok(f"CREATE {quote(wire)}")
        client.ok("RENAME x.y x..z")
    after = mailbox_names(mailsuite, address)
    assert after - before == {"ÉÉ", "x..z", "..x", "a~b", "a#b", "x", "x/.hidden"}
    assert before - after == set()


# =========================================================================== parser nesting
def test_fetch_sections_nested_in_header_lists_are_bad_not_a_crash(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    mark = log_mark(mailsuite)
    with session(mailsuite, address) as client:
        client.append("INBOX", b"Subject: x\r\n\r\nx\r\n")
        client.ok("SELECT INBOX")
        reply = client.command("FETCH 1 (" + "BODY[HEADER.FIELDS (" * 3000 + ")")
        assert reply.status == "BAD", reply
        assert client.fetch("1", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]")  # the session goes on
    log = log_since(mailsuite, mark)
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
