"""Pipelining only where it was offered, and message text only after the 354 (RFC 2920).

Refused as Postfix's smtpd_forbid_unauth_pipelining does: 554 5.5.0, then the connection is
closed, and nothing of the transaction is stored.
"""

from __future__ import annotations

from tests.harness import Mailsuite
from tests.smtp.smtp_client import RawSMTP
from tests.smtp.test_mx_data import SENDER, dot_stuff

MESSAGE = b"Subject: pipelined\r\n\r\nbody\r\n"


def greeted(server: Mailsuite) -> RawSMTP:
    client = RawSMTP(server.mx)
    assert client.greeting()[0] == 220
    return client


def assert_refused_and_closed(client: RawSMTP, server: Mailsuite, offset: int) -> None:
    code, text = client.reply()
    assert (code, text) == (554, "5.5.0 Error: SMTP protocol synchronization")
    assert client.closed()
    client.close()
    log = server.log()[offset:]
    assert "smtp improper pipelining" in log
    assert "Traceback" not in log


def test_commands_pipelined_after_helo_are_refused(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    offset = len(mailsuite.log())
    client = greeted(mailsuite)
    assert client.cmd("HELO client.test")[0] == 250
    client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    assert_refused_and_closed(client, mailsuite, offset)
    assert mailsuite.inbox(rcpt) == []


def test_commands_pipelined_behind_helo_itself_are_refused(mailsuite: Mailsuite) -> None:
    offset = len(mailsuite.log())
    client = greeted(mailsuite)
    client.send(f"HELO client.test\r\nMAIL FROM:<{SENDER}>\r\n".encode())
    assert_refused_and_closed(client, mailsuite, offset)


def test_commands_pipelined_behind_ehlo_before_its_reply_are_refused(
        mailsuite: Mailsuite) -> None:
    # PIPELINING is offered in the EHLO reply; a client cannot know it before reading it.
    offset = len(mailsuite.log())
    client = greeted(mailsuite)
    client.send(f"EHLO client.test\r\nMAIL FROM:<{SENDER}>\r\n".encode())
    assert_refused_and_closed(client, mailsuite, offset)


def test_message_text_before_the_354_is_refused_even_with_pipelining(
        mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    offset = len(mailsuite.log())
    client = greeted(mailsuite)
    assert "PIPELINING" in client.cmd("EHLO client.test")[1]
    client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode()
                + dot_stuff(MESSAGE))
    assert client.reply()[0] == 250
    assert client.reply()[0] == 250
    assert_refused_and_closed(client, mailsuite, offset)
    assert mailsuite.inbox(rcpt) == []


def test_rfc_2920_groups_after_ehlo_keep_working(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    client = greeted(mailsuite)
    assert "PIPELINING" in client.cmd("EHLO client.test")[1]
    for _ in range(2):
        client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        assert [client.reply()[0] for _ in range(3)] == [250, 250, 354]
        # The end of data and the next group's first commands may travel together.
        client.send(dot_stuff(MESSAGE) + b"RSET\r\nNOOP\r\n")
        assert [client.reply()[0] for _ in range(3)] == [250, 250, 250]
    assert client.cmd("QUIT")[0] == 221
    client.close()
    assert len(mailsuite.inbox(rcpt)) == 2


def test_helo_client_that_waits_for_each_reply_is_served(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    client = greeted(mailsuite)
    assert client.cmd("HELO client.test")[0] == 250
    assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(dot_stuff(MESSAGE))
    assert client.reply()[0] == 250
    assert client.cmd("QUIT")[0] == 221
    client.close()
    assert len(mailsuite.inbox(rcpt)) == 1


def test_command_pipelined_after_the_end_of_data_without_pipelining_is_refused(
        mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    offset = len(mailsuite.log())
    client = greeted(mailsuite)
    assert client.cmd("HELO client.test")[0] == 250
    assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(dot_stuff(MESSAGE) + b"MAIL FROM:<>\r\n")
    assert_refused_and_closed(client, mailsuite, offset)
    assert mailsuite.inbox(rcpt) == []
