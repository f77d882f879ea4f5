"""The ESMTP protocol of the inbound MX (RFC 5321, 2920, 3207, 6531, 1870), over real sockets."""

from __future__ import annotations

import smtplib
import time

from mailsuite.config import SMTPConfig
from tests.harness import TEST_HOSTNAME, Mailsuite
from tests.smtp.smtp_client import RawSMTP

SENDER = "sender@spf-pass.test"
MAX_SIZE = SMTPConfig().max_message_size  # the shared test server runs with the default
OFFERED = {f"SIZE {MAX_SIZE}", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"}


def connect(server: Mailsuite) -> RawSMTP:
    client = RawSMTP(server.mx)
    code, text = client.greeting()
    assert code == 220, text
    return client


def ehlo(client: RawSMTP) -> list[str]:
    """The EHLO reply lines: the server's name first, then one extension per line."""
    code, text = client.cmd("EHLO client.test")
    assert code == 250, text
    return text.split("\n")


def status(reply: tuple[int, str]) -> tuple[int, str]:
    """(reply code, enhanced status code)."""
    code, text = reply
    return code, text.split(" ", 1)[0]


def deliver(client: RawSMTP, recipient: str,
            body: bytes = b"Subject: t\r\n\r\nbody\r\n") -> None:
    """One whole transaction on an open, EHLO'd session; asserts it is accepted."""
    assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{recipient}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(body + b".\r\n")
    code, text = client.reply()
    assert code == 250, text


def nothing_more_buffered(client: RawSMTP, wait: float = 0.3) -> bool:
    """True when the server sent nothing beyond what was read (waits `wait` seconds)."""
    client.sock.settimeout(wait)
    try:
        return client.file.peek(1) == b""  # b"" only at EOF; bytes mean an extra reply
    except TimeoutError:
        return True
    finally:
        client.sock.settimeout(10.0)


# --- EHLO / HELO ---------------------------------------------------------------------------
def test_ehlo_advertises_exactly_the_implemented_extensions(mailsuite: Mailsuite) -> None:
    client = connect(mailsuite)
    lines = ehlo(client)
    assert lines[0] == TEST_HOSTNAME
    assert sorted(lines[1:]) == sorted(OFFERED | {"STARTTLS"})  # no AUTH, CHUNKING, DSN
    client.close()


def test_ehlo_after_starttls_no_longer_offers_starttls(mailsuite: Mailsuite) -> None:
    client = connect(mailsuite)
    ehlo(client)
    assert status(client.cmd("STARTTLS")) == (220, "2.0.0")
    client.starttls()
    lines = ehlo(client)
    assert sorted(lines[1:]) == sorted(OFFERED)
    assert status(client.cmd("STARTTLS")) == (503, "5.5.1")
    client.close()


def test_helo_still_works_and_mail_sent_after_helo_is_stored(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    with smtplib.SMTP(*mailsuite.mx, local_hostname="old-client.test") as smtp:
        code, text = smtp.helo()
        assert (code, text) == (250, TEST_HOSTNAME.encode())
        assert smtp.sendmail(SENDER, [rcpt], b"Subject: helo\r\n\r\nplain SMTP\r\n") == {}
    [stored] = mailsuite.inbox(rcpt)
    assert b"Received: from old-client.test ([127.0.0.1])" in stored
    assert b" with SMTP id " in stored  # not ESMTP: the session began with HELO
    assert stored.endswith(b"Subject: helo\r\n\r\nplain SMTP\r\n")


# --- greeting ------------------------------------------------------------------------------
def test_client_that_talks_before_the_greeting_gets_554_and_is_disconnected(
        start_mailsuite) -> None:  # type: ignore[no-untyped-def]
    # A longer delay than the tests' 0.05 s, so a busy test machine cannot make us late.
    server = start_mailsuite({"smtp": {"greeting_delay": 1.0}})
    rcpt = server.new_account()
    client = RawSMTP(server.mx)
    client.send(f"EHLO client.test\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n"
                "Subject: early\r\n\r\ntoo early\r\n.\r\nQUIT\r\n".encode())
    assert status(client.reply()) == (554, "5.5.1")
    assert client.closed()
    client.close()
    assert server.inbox(rcpt) == []


# --- STARTTLS ------------------------------------------------------------------------------
def test_plaintext_pipelined_after_starttls_is_discarded(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    client = connect(mailsuite)
    ehlo(client)
    client.send(f"STARTTLS\r\nMAIL FROM:<a@spf-pass.test>\r\nRCPT TO:<{rcpt}>\r\n".encode())
    assert status(client.reply()) == (220, "2.0.0")
    # The injected MAIL and RCPT were never answered, in plaintext or otherwise.
    assert nothing_more_buffered(client)
    client.starttls()
    # RFC 3207 4.2: the session is reset; the injected MAIL FROM did not open a transaction.
    code, text = client.cmd(f"MAIL FROM:<{SENDER}>")
    assert (code, text.split(" ", 1)[0]) == (503, "5.5.1") and "HELO" in text, text
    assert status(client.cmd(f"RCPT TO:<{rcpt}>")) == (503, "5.5.1")
    ehlo(client)
    deliver(client, rcpt, b"Subject: after tls\r\n\r\nsecret\r\n")
    client.close()
    [stored] = mailsuite.inbox(rcpt)
    assert b" with ESMTPS id " in stored
    assert stored.endswith(b"Subject: after tls\r\n\r\nsecret\r\n")


# --- limits --------------------------------------------------------------------------------
def test_command_line_longer_than_the_limit_gets_500_and_session_continues(
        mailsuite: Mailsuite) -> None:
    client = connect(mailsuite)
    ehlo(client)
    limit = SMTPConfig().max_command_line
    longest = "NOOP " + "x" * (limit - 2 - len("NOOP "))  # exactly the limit with CRLF
    assert client.cmd(longest)[0] == 250
    assert status(client.cmd(longest + "x")) == (500, "5.5.2")
    assert status(client.cmd("NOOP " + "y" * 5000)) == (500, "5.5.2")
    assert client.cmd("NOOP")[0] == 250
    client.close()


def test_too_many_junk_commands_get_421_4_7_0_and_the_connection_is_closed(
        start_mailsuite) -> None:  # type: ignore[no-untyped-def]
    limit = 3
    server = start_mailsuite({"smtp": {"max_junk_commands": limit}})
    client = connect(server)
    ehlo(client)  # pipelining is offered from here on (before it: see test_mx_pipelining)
    client.send(b"XYZZY\r\n" * (limit + 2))
    replies = []
    while True:
        try:
            replies.append(status(client.reply()))
        except ConnectionError:
            break
    # `limit` junk commands are tolerated (answered 500); the next one ends the session.
    assert [code for code, _ in replies] == [500] * limit + [421], replies
    assert replies[-1] == (421, "4.7.0"), replies
    client.close()


def test_silent_client_gets_421_4_4_2_after_the_idle_timeout(start_mailsuite) -> None:  # type: ignore[no-untyped-def]
    server = start_mailsuite({"smtp": {"idle_timeout": 1.0}})
    client = connect(server)
    ehlo(client)
    started = time.monotonic()
    assert status(client.reply()) == (421, "4.4.2")
    assert 0.8 <= time.monotonic() - started < 5.0
    assert client.closed()
    client.close()


def test_connections_beyond_the_per_ip_limit_get_421_4_7_0(start_mailsuite) -> None:  # type: ignore[no-untyped-def]
    server = start_mailsuite({"smtp": {"max_connections_per_ip": 2}})
    first, second = connect(server), connect(server)
    third = RawSMTP(server.mx)
    assert status(third.reply()) == (421, "4.7.0")
    assert third.closed()
    third.close()
    first.close()
    # The server frees the slot when it notices the close; give it a moment to do so.
    deadline = time.monotonic() + 5.0
    while True:
        fourth = RawSMTP(server.mx)
        code, text = fourth.reply()
        if code == 220 or time.monotonic() > deadline:
            break
        fourth.close()
        time.sleep(0.05)
    assert code == 220, text
    assert second.cmd("NOOP")[0] == 250
    fourth.close()
    second.close()


# --- PIPELINING ----------------------------------------------------------------------------
def test_pipelined_commands_are_answered_in_order(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    first, second = mailsuite.new_account(domain), mailsuite.new_account(domain)
    client = connect(mailsuite)
    assert "PIPELINING" in ehlo(client)
    client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{first}>\r\nRCPT TO:<nobody@{domain}>\r\n"
                f"RCPT TO:<{second}>\r\nDATA\r\n".encode())
    replies = [status(client.reply()) for _ in range(5)]
    assert [code for code, _ in replies] == [250, 250, 550, 250, 354], replies
    assert replies[2] == (550, "5.1.1")
    client.send(b"Subject: pipelined\r\n\r\nin one go\r\n.\r\n")
    assert client.reply()[0] == 250
    client.close()
    assert len(mailsuite.inbox(first)) == 1
    assert len(mailsuite.inbox(second)) == 1


# --- command errors ------------------------------------------------------------------------
def test_unknown_command_gets_500_5_5_2(mailsuite: Mailsuite) -> None:
    client = connect(mailsuite)
    assert status(client.cmd("FROBNICATE now")) == (500, "5.5.2")
    assert client.cmd("NOOP")[0] == 250
    client.close()


def test_rcpt_before_mail_gets_503_5_5_1(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    client = connect(mailsuite)
    ehlo(client)
    assert status(client.cmd(f"RCPT TO:<{rcpt}>")) == (503, "5.5.1")
    assert status(client.cmd("DATA")) == (503, "5.5.1")
    client.close()


def test_data_without_any_accepted_recipient_gets_554(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    client = connect(mailsuite)
    ehlo(client)
    assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert client.cmd(f"RCPT TO:<nobody@{domain}>")[0] == 550
    assert client.cmd("DATA")[0] == 554
    assert client.cmd("NOOP")[0] == 250  # no 354: we are not in DATA
    client.close()


def test_mail_parameters_after_helo_get_555(mailsuite: Mailsuite) -> None:
    client = connect(mailsuite)
    assert client.cmd("HELO client.test")[0] == 250
    assert status(client.cmd(f"MAIL FROM:<{SENDER}> SIZE=100")) == (555, "5.5.4")
    assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    client.close()


def test_unknown_mail_parameter_gets_555_5_5_4(mailsuite: Mailsuite) -> None:
    client = connect(mailsuite)
    ehlo(client)
    assert status(client.cmd(f"MAIL FROM:<{SENDER}> RET=HDRS")) == (555, "5.5.4")
    assert status(client.cmd(f"MAIL FROM:<{SENDER}> BODY=BINARYMIME")) == (555, "5.5.4")
    assert client.cmd(f"MAIL FROM:<{SENDER}> BODY=8BITMIME")[0] == 250
    client.close()


def test_rset_clears_the_transaction(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    client = connect(mailsuite)
    ehlo(client)
    assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert status(client.cmd("RSET")) == (250, "2.0.0")
    assert status(client.cmd("DATA")) == (503, "5.5.1")  # the recipient is gone too
    assert status(client.cmd(f"RCPT TO:<{rcpt}>")) == (503, "5.5.1")
    deliver(client, rcpt)  # a new MAIL is not "nested"
    client.close()
    assert len(mailsuite.inbox(rcpt)) == 1


def test_quit_gets_221_and_closes_the_connection(mailsuite: Mailsuite) -> None:
    client = connect(mailsuite)
    assert status(client.cmd("QUIT")) == (221, "2.0.0")
    assert client.closed()
    client.close()


def test_vrfy_gets_252_and_reveals_nothing(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    client = connect(mailsuite)
    ehlo(client)
    known, unknown = client.cmd(f"VRFY {rcpt}"), client.cmd("VRFY nobody@nowhere.test")
    assert known[0] == unknown[0] == 252
    assert known == unknown
    client.close()


# --- SIZE (RFC 1870) -----------------------------------------------------------------------
def test_mail_from_with_size_over_the_limit_gets_552_5_3_4(mailsuite: Mailsuite) -> None:
    client = connect(mailsuite)
    ehlo(client)
    assert status(client.cmd(f"MAIL FROM:<{SENDER}> SIZE={MAX_SIZE + 1}")) == (552, "5.3.4")
    assert client.cmd(f"MAIL FROM:<{SENDER}> SIZE={MAX_SIZE}")[0] == 250
    client.close()


# --- SMTPUTF8 (RFC 6531) -------------------------------------------------------------------
def test_non_ascii_address_without_smtputf8_gets_553_5_6_7(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    client = connect(mailsuite)
    ehlo(client)
    assert status(client.cmd("MAIL FROM:<jösé@spf-pass.test>")) == (553, "5.6.7")
    assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert status(client.cmd(f"RCPT TO:<jösé@{domain}>")) == (553, "5.6.7")
    client.close()


def test_non_ascii_sender_with_smtputf8_is_accepted_and_delivered(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    client = connect(mailsuite)
    assert "SMTPUTF8" in ehlo(client)
    assert client.cmd("MAIL FROM:<jösé@spf-pass.test> SMTPUTF8")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    body = "From: jösé@spf-pass.test\r\nSubject: ¡hola!\r\n\r\nÜnïcödé\r\n".encode()
    client.send(body + b".\r\n")
    code, text = client.reply()
    assert code == 250, text
    client.close()
    [stored] = mailsuite.inbox(rcpt)
    assert stored.startswith("Return-Path: <jösé@spf-pass.test>\r\n".encode())
    assert b" with UTF8SMTP id " in stored
    assert stored.endswith(body)


# --- concurrency ---------------------------------------------------------------------------
def test_a_client_stalled_in_data_does_not_block_other_clients(mailsuite: Mailsuite) -> None:
    slow_rcpt, fast_rcpt = mailsuite.new_account(), mailsuite.new_account()
    slow = connect(mailsuite)
    ehlo(slow)
    assert slow.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert slow.cmd(f"RCPT TO:<{slow_rcpt}>")[0] == 250
    assert slow.cmd("DATA")[0] == 354
    slow.send(b"Subject: slow\r\n\r\nhalf a li")
    with smtplib.SMTP(*mailsuite.mx, timeout=10) as smtp:
        assert smtp.sendmail(SENDER, [fast_rcpt], b"Subject: fast\r\n\r\nquick\r\n") == {}
    assert len(mailsuite.inbox(fast_rcpt)) == 1
    assert mailsuite.inbox(slow_rcpt) == []
    slow.send(b"ne\r\n.\r\n")
    assert slow.reply()[0] == 250
    slow.close()
    [stored] = mailsuite.inbox(slow_rcpt)
    assert stored.endswith(b"Subject: slow\r\n\r\nhalf a line\r\n")
