"""The POP3 maildrop over the shared store (RFC 1939 5-6, RFC 2449): STAT, LIST, UIDL, RETR,
TOP, DELE, RSET, NOOP and QUIT, the snapshot taken at login, the UPDATE state, what IMAP (for
now: the store) sees of it, and every kind of bad input."""

from __future__ import annotations

import hashlib
import poplib
import re
from collections.abc import Callable, Iterator

import pytest

from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite, own_server
from tests.pop3.test_pop3_session import (
    PASSWORD,
    err,
    make_message,
    message_id,
    pop_session,
    raw_session,
    restart,
    smtp_deliver,
    store_deliver,
)

# A message whose lines start with dots: the wire form must double each leading dot.
DOTTED_BODY = (b"first line\r\n"
               b".hidden line\r\n"
               b".\r\n"
               b"..two dots\r\n"
               b"last line\r\n")


@pytest.fixture(scope="module")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """This module's own server instead of the shared one (see own_server)."""
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "pop3-maildrop")


def wire_form(raw: bytes) -> bytes:
    """What RETR must send after its +OK line (RFC 1939 3): every line of `raw` ending in
    CRLF, a dot doubled at the start of each line that has one, then ".CRLF"."""
    lines = re.split(rb"\r?\n", raw)
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


def top_form(raw: bytes, count: int) -> bytes:
    """The message TOP count must send: the header, the blank line, `count` body lines."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return head + b"\r\n\r\n" + b"".join(line + b"\r\n" for line in lines[:count])


def retrieved(client: poplib.POP3, number: int) -> bytes:
    """RETR through poplib (which undoes dot-stuffing), as the message's bytes."""
    response, lines, _ = client.retr(number)
    assert response.startswith(b"+OK")
    return b"".join(line + b"\r\n" for line in lines)


def uidl_map(client: poplib.POP3) -> dict[int, str]:
    response, lines, _ = client.uidl()
    assert response.startswith(b"+OK")
    return {int(n): uid for n, uid in (line.decode().split(" ", 1) for line in lines)}


def list_map(client: poplib.POP3) -> dict[int, int]:
    response, lines, _ = client.list()
    assert response.startswith(b"+OK")
    return {int(n): int(size) for n, size in (line.split(b" ") for line in lines)}


def filled_account(server: Mailsuite, count: int = 3) -> tuple[str, list[bytes]]:
    """A new account with `count` messages delivered over SMTP; (address, stored bytes)."""
    address = server.new_account()
    stored = [smtp_deliver(server, address, make_message(f"message {i}"))
              for i in range(count)]
    return address, stored


# ------------------------------------------------------------------ STAT, LIST, UIDL


def test_stat_gives_the_number_of_messages_and_the_size_of_the_maildrop(
        mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite)
    with pop_session(mailsuite, address) as client:
        assert client.stat() == (3, sum(len(raw) for raw in stored))
        client.quit()


def test_stat_of_an_empty_maildrop_is_zero_zero(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with pop_session(mailsuite, address) as client:
        assert client.stat() == (0, 0)
        assert list_map(client) == {}
        assert uidl_map(client) == {}
        client.quit()


def test_list_gives_each_message_number_and_its_exact_size_in_octets(
        mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite)
    with pop_session(mailsuite, address) as client:
        assert list_map(client) == {n: len(raw) for n, raw in enumerate(stored, 1)}
        assert client.list(2) == f"+OK 2 {len(stored[1])}".encode()
        for n, raw in enumerate(stored, 1):  # the size is what RETR sends, before stuffing
            assert len(retrieved(client, n)) == len(raw)
        client.quit()


def test_uidl_gives_unique_ids_of_printable_characters(mailsuite: Mailsuite) -> None:
    # RFC 1939 7: 1 to 70 characters in the range 0x21 to 0x7E, unique in the maildrop.
    address, _ = filled_account(mailsuite)
    with pop_session(mailsuite, address) as client:
        ids = uidl_map(client)
        assert sorted(ids) == [1, 2, 3]
        assert len(set(ids.values())) == 3
        for uid in ids.values():
            assert re.fullmatch(r"[\x21-\x7e]{1,70}", uid), uid
        assert client.uidl(3) == f"+OK 3 {ids[3]}".encode()
        client.quit()


def test_uidl_is_the_same_in_the_next_session_and_never_reused(
        mailsuite: Mailsuite) -> None:
    address, _ = filled_account(mailsuite)
    with pop_session(mailsuite, address) as client:
        first = uidl_map(client)
        client.dele(2)
        client.quit()
    smtp_deliver(mailsuite, address, make_message("newcomer"))
    with pop_session(mailsuite, address) as client:
        second = uidl_map(client)
        client.quit()
    assert second[1] == first[1] and second[2] == first[3]  # renumbered, same ids
    assert second[3] not in first.values()  # the deleted message's id is not reused


def test_uidl_is_the_same_after_a_server_restart(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite()
    address = server.new_account()
    for i in range(3):
        store_deliver(server, address, make_message(f"message {i}"))
    with pop_session(server, address) as client:
        before = uidl_map(client)
        client.quit()
    restart(server)
    with pop_session(server, address) as client:
        assert uidl_map(client) == before
        client.quit()


# ------------------------------------------------------------------------ RETR / TOP


def test_retr_sends_exactly_the_message_delivered_over_smtp(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    sent = make_message("exact", DOTTED_BODY + b"trailing spaces   \r\n\ttab\r\n")
    stored = smtp_deliver(mailsuite, address, sent)  # the MX prepends its trace fields
    with pop_session(mailsuite, address) as client:
        raw = retrieved(client, 1)
        client.quit()
    assert raw == stored
    assert raw.endswith(sent)


def test_retr_on_the_wire_is_dot_stuffed_crlf_lines_ending_with_crlf_dot_crlf(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    stored = smtp_deliver(mailsuite, address, make_message("dots", DOTTED_BODY))
    with raw_session(mailsuite, address=address) as client:
        assert client.cmd("RETR 1").startswith("+OK")
        wire = client.multiline()
        assert client.cmd("NOOP") == "+OK"  # nothing was left over after the terminator
        assert client.cmd("QUIT").startswith("+OK")
    assert wire == wire_form(stored)
    assert b"\r\n..hidden line\r\n..\r\n...two dots\r\n" in wire
    assert wire.endswith(b"last line\r\n.\r\n")


def test_retr_of_a_message_without_a_final_line_end_still_ends_with_crlf_dot_crlf(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    raw = make_message("no final CRLF", b"the last line has no end")
    store_deliver(mailsuite, address, raw)
    with raw_session(mailsuite, address=address) as client:
        assert client.cmd("RETR 1").startswith("+OK")
        assert client.multiline() == raw + b"\r\n.\r\n"
        assert client.cmd("NOOP") == "+OK"


def test_retr_of_a_stored_message_with_bare_lf_sends_crlf_lines_and_stuffs_dots(
        mailsuite: Mailsuite) -> None:
    # The store takes any bytes (IMAP APPEND will); on the wire every line must end in CRLF
    # and a lone "." line must be stuffed, or it would end the response early.
    address = mailsuite.new_account()
    raw = b"Subject: bare LF\n\nline one\n.\nline three\n"
    store_deliver(mailsuite, address, raw)
    with raw_session(mailsuite, address=address) as client:
        assert client.cmd("RETR 1").startswith("+OK")
        wire = client.multiline()
        assert wire == wire_form(raw)
        assert client.cmd("NOOP") == "+OK"


def test_retr_of_a_5_mb_message_arrives_complete(
        mailsuite: Mailsuite, start_mailsuite: Callable[..., Mailsuite]) -> None:
    line = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n"
    body = b"".join((b"." + line if i % 97 == 0 else line) for i in range(5 * 2**20 // 78))
    raw = make_message("large", body)
    assert len(raw) > 5 * 10**6
    for via in ("pop3s", "stls", "plain"):
        server = (start_mailsuite({"auth": {"allow_plaintext": True}}) if via == "plain"
                  else mailsuite)
        address = server.new_account()
        store_deliver(server, address, raw)
        with pop_session(server, address, via=via) as client:
            assert client.list(1) == f"+OK 1 {len(raw)}".encode()
            got = retrieved(client, 1)
            assert len(got) == len(raw), via
            assert hashlib.sha256(got).digest() == hashlib.sha256(raw).digest(), via
            assert client.noop().startswith(b"+OK")
            client.quit()


def test_top_sends_the_header_the_blank_line_and_n_body_lines(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    stored = smtp_deliver(mailsuite, address, make_message("top", DOTTED_BODY))
    body_lines = DOTTED_BODY.count(b"\r\n")
    with raw_session(mailsuite, address=address) as client:
        for count in (0, 1, 3, body_lines, body_lines + 10):
            assert client.cmd(f"TOP 1 {count}").startswith("+OK"), count
            assert client.multiline() == wire_form(top_form(stored, count)), count
        assert client.cmd("NOOP") == "+OK"


def test_top_with_more_lines_than_the_body_sends_the_entire_message(
        mailsuite: Mailsuite) -> None:
    # RFC 1939 7: "If the number of lines requested by the POP3 client is greater than
    # than the number of lines in the body, then the POP3 server sends the entire message."
    address = mailsuite.new_account()
    stored = smtp_deliver(mailsuite, address, make_message("top all", DOTTED_BODY))
    with raw_session(mailsuite, address=address) as client:
        for count in ("999999999", "4294967296", "99999999999999999999"):
            answer = client.cmd(f"TOP 1 {count}")
            assert answer.startswith("+OK"), (count, answer)
            assert client.multiline() == wire_form(stored), count
        assert client.cmd("NOOP") == "+OK"


def test_retr_sets_seen_for_imap_and_top_does_not(mailsuite: Mailsuite) -> None:
    address, _ = filled_account(mailsuite, 2)
    with pop_session(mailsuite, address) as client:
        client.top(1, 5)
        retrieved(client, 2)
        client.noop()  # answered only after the RETR (and its flag) is done
        flags = {m.uid: m.flags.split() for m in mailsuite.store.messages(address)}
        client.quit()
    first, second = sorted(flags)
    assert "\\Seen" not in flags[first]
    assert "\\Seen" in flags[second]


# ---------------------------------------------------------- DELE, RSET, QUIT (UPDATE)


def test_dele_only_marks_and_quit_removes_the_message_from_the_store(
        mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite)
    with pop_session(mailsuite, address) as client:
        ids = uidl_map(client)
        assert client.dele(2).startswith(b"+OK")
        assert client.stat() == (2, len(stored[0]) + len(stored[2]))
        assert list_map(client) == {1: len(stored[0]), 3: len(stored[2])}
        assert uidl_map(client) == {1: ids[1], 3: ids[3]}
        assert err(lambda: client.retr(2))
        assert err(lambda: client.dele(2))
        assert err(lambda: client.list(2))
        assert err(lambda: client.top(2, 0))
        assert retrieved(client, 3) == stored[2]  # numbers do not change
        assert mailsuite.inbox(address) == stored  # nothing removed before QUIT
        assert client.quit().startswith(b"+OK")
    assert mailsuite.inbox(address) == [stored[0], stored[2]]
    with pop_session(mailsuite, address) as client:
        assert uidl_map(client) == {1: ids[1], 2: ids[3]}
        client.quit()


def test_quit_in_the_update_state_removes_every_marked_message(
        mailsuite: Mailsuite) -> None:
    address, _ = filled_account(mailsuite)
    with pop_session(mailsuite, address) as client:
        for n in (1, 2, 3):
            client.dele(n)
        assert client.stat() == (0, 0)
        assert client.quit().startswith(b"+OK")
    assert mailsuite.inbox(address) == []
    assert mailsuite.store.messages(address) == []


def test_rset_unmarks_every_message_marked_as_deleted(mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite)
    with pop_session(mailsuite, address) as client:
        client.dele(1)
        client.dele(3)
        assert client.rset().startswith(b"+OK")
        assert client.stat() == (3, sum(len(raw) for raw in stored))
        assert retrieved(client, 1) == stored[0]
        client.quit()
    assert mailsuite.inbox(address) == stored


def test_a_dropped_connection_deletes_nothing(mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite)
    with pop_session(mailsuite, address) as client:
        for n in (1, 2, 3):
            client.dele(n)
        # no QUIT: the connection just goes away
    with pop_session(mailsuite, address) as client:
        assert client.stat()[0] == 3
        client.quit()
    assert mailsuite.inbox(address) == stored


def test_quit_in_the_authorization_state_deletes_nothing(mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite, 1)
    with pop_session(mailsuite) as client:
        client.user(address)
        assert client.quit().startswith(b"+OK")
    assert mailsuite.inbox(address) == stored


def test_noop_answers_ok_and_changes_nothing(mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite, 1)
    with raw_session(mailsuite, address=address) as client:
        assert client.cmd("NOOP") == "+OK"
        assert client.cmd("STAT") == f"+OK 1 {len(stored[0])}"


# ------------------------------------------------------------- snapshot and the store


def test_the_maildrop_is_the_inbox_as_it_was_at_login(mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite, 2)
    with pop_session(mailsuite, address) as client:
        late = smtp_deliver(mailsuite, address, make_message("arrived during the session"))
        assert client.stat() == (2, len(stored[0]) + len(stored[1]))
        assert sorted(list_map(client)) == [1, 2]
        assert err(lambda: client.retr(3))
        client.quit()
    with pop_session(mailsuite, address) as client:
        assert client.stat()[0] == 3
        assert retrieved(client, 3) == late
        client.quit()


def test_a_message_expunged_through_the_store_is_gone_from_the_next_session(
        mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite)
    account = mailsuite.store.account_get(address)
    assert account is not None
    uid = mailsuite.store.messages(address)[0].uid
    assert mailsuite.store.expunge(account.id, "INBOX", [uid]) == 1
    with pop_session(mailsuite, address) as client:
        assert client.stat() == (2, len(stored[1]) + len(stored[2]))
        assert [message_id(retrieved(client, n)) for n in (1, 2)] == [
            message_id(raw) for raw in stored[1:]]
        client.quit()


def test_retr_of_a_message_expunged_during_the_session_gets_err_and_session_goes_on(
        mailsuite: Mailsuite) -> None:
    address, stored = filled_account(mailsuite, 2)
    account = mailsuite.store.account_get(address)
    assert account is not None
    with pop_session(mailsuite, address) as client:
        uid = mailsuite.store.messages(address)[0].uid
        assert mailsuite.store.expunge(account.id, "INBOX", [uid]) == 1
        assert err(lambda: client.retr(1))
        assert err(lambda: client.top(1, 0))
        assert retrieved(client, 2) == stored[1]
        client.dele(1)
        client.dele(2)
        assert client.quit().startswith(b"+OK")
    assert mailsuite.inbox(address) == []


# ------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def bad_input_account(mailsuite: Mailsuite) -> Iterator[tuple[str, str]]:
    """An account with two messages; (address, its STAT answer). Nobody may change it."""
    address = mailsuite.new_account()
    for i in range(2):
        store_deliver(mailsuite, address, make_message(f"bad input {i}"))
    sizes = sum(len(raw) for raw in mailsuite.inbox(address))
    yield address, f"+OK 2 {sizes}"
    assert len(mailsuite.inbox(address)) == 2


TRANSACTION_BAD_INPUT = [
    # missing message numbers or line counts
    "RETR", "DELE", "TOP", "TOP 1",
    # negative ones
    "RETR -1", "DELE -1", "LIST -1", "UIDL -1", "TOP -1 1", "TOP 1 -1",
    # zero
    "RETR 0", "DELE 0", "LIST 0", "UIDL 0", "TOP 0 1",
    # past the end, huge, absurd
    "RETR 3", "DELE 3", "LIST 3", "UIDL 3", "TOP 3 0",
    "RETR 999999999", "RETR 4294967297", "DELE 18446744073709551617",
    "LIST 99999999999999999999999999999999", "UIDL 1e3", "RETR 0x1", "RETR 1.0",
    "RETR +1", "RETR one", "TOP 1 x",
    # extra arguments
    "STAT 1", "LIST 1 2", "UIDL 1 2", "RETR 1 2", "DELE 1 2", "TOP 1 2 3", "NOOP 1",
    "RSET 1", "QUIT 1", "CAPA 1",
    # commands of the AUTHORIZATION state, and unknown ones
    "USER someone", f"PASS {PASSWORD}", "AUTH PLAIN AGZvbwBiYXI=", "STLS", "APOP a b",
    "XYZZY", "LAST", "",
]


@pytest.mark.parametrize("command", TRANSACTION_BAD_INPUT)
def test_bad_input_in_the_transaction_state_gets_err_and_the_session_goes_on(
        mailsuite: Mailsuite, bad_input_account: tuple[str, str], command: str) -> None:
    address, stat = bad_input_account
    with raw_session(mailsuite, address=address) as client:
        answer = client.cmd(command)
        assert answer.startswith("-ERR"), (command, answer)
        assert client.cmd("NOOP") == "+OK", command
        assert client.cmd("STAT") == stat, command  # nothing was marked
        assert client.cmd("RSET").startswith("+OK")
        assert client.cmd("QUIT").startswith("+OK")


@pytest.mark.parametrize("command", ["RETR \u00b2", "LIST \u00b2", "DELE \u00b9",
                                     "TOP 1 \u00b2", "RETR \u0661", "UIDL \uff11"])
def test_message_numbers_and_line_counts_in_non_ascii_digits_get_err(
        mailsuite: Mailsuite, bad_input_account: tuple[str, str], command: str) -> None:
    # RFC 1939 3: arguments are numbers written in (ASCII) decimal digits.
    address, stat = bad_input_account
    with raw_session(mailsuite, address=address) as client:
        answer = client.cmd(command)
        assert answer.startswith("-ERR"), (command, answer)
        assert client.cmd("NOOP") == "+OK", command
        assert client.cmd("STAT") == stat, command
        assert client.cmd("RSET").startswith("+OK")
        assert client.cmd("QUIT").startswith("+OK")


def test_a_command_that_is_not_utf8_gets_err_and_the_session_goes_on(
        mailsuite: Mailsuite, bad_input_account: tuple[str, str]) -> None:
    address, stat = bad_input_account
    with raw_session(mailsuite, address=address) as client:
        assert client.cmd(b"RETR \xff\xfe").startswith("-ERR")
        assert client.cmd(b"\x00\x01\x02").startswith("-ERR")
        assert client.cmd("STAT") == stat
        assert client.cmd("QUIT").startswith("+OK")


@pytest.mark.parametrize("command", ["STAT", "LIST", "LIST 1", "UIDL", "UIDL 1", "RETR 1",
                                     "TOP 1 0", "DELE 1", "NOOP", "RSET"])
def test_transaction_commands_before_login_get_err_and_the_session_goes_on(
        mailsuite: Mailsuite, bad_input_account: tuple[str, str], command: str) -> None:
    address, stat = bad_input_account
    with raw_session(mailsuite) as client:
        answer = client.cmd(command)
        assert answer.startswith("-ERR"), (command, answer)
        assert client.cmd("CAPA").startswith("+OK")
        client.multiline()
        assert client.cmd(f"USER {address}").startswith("+OK")
        assert client.cmd(f"PASS {PASSWORD}").startswith("+OK")
        assert client.cmd("STAT") == stat
        assert client.cmd("QUIT").startswith("+OK")


def test_a_line_over_255_octets_gets_err_and_the_session_goes_on(
        mailsuite: Mailsuite, bad_input_account: tuple[str, str]) -> None:
    # RFC 2449 4: commands are at most 255 octets including the CRLF.
    address, stat = bad_input_account
    with raw_session(mailsuite, address=address) as client:
        assert client.cmd("DELE 1" + " " * 300).startswith("-ERR")
        assert client.cmd("NOOP") == "+OK"
        # The same, arriving in pieces: the first piece alone is already too long.
        client.send(b"DELE 2" + b" " * 290)
        client.send(b" " * 100 + b"\r\nNOOP\r\n")
        assert client.status().startswith("-ERR")
        assert client.status() == "+OK"
        assert client.cmd("STAT") == stat  # neither DELE was carried out
        assert client.cmd("X" * 100_000).startswith("-ERR")
        assert client.cmd("STAT") == stat
        assert client.cmd("QUIT").startswith("+OK")


def test_a_line_of_exactly_255_octets_is_accepted_and_256_is_refused(
        mailsuite: Mailsuite) -> None:
    with raw_session(mailsuite) as client:
        longest = "USER " + "a" * 248  # 253 octets + CRLF = 255
        assert client.cmd(longest).startswith("+OK")
        assert client.cmd(longest + "a").startswith("-ERR")
        assert client.cmd("CAPA").startswith("+OK")
        client.multiline()
