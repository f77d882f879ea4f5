"""Submission refuses a From: whose display name or comment shows someone else's address.

`alice@example.test(<ceo@bank.test>` is alice's address to the sender check, and
"<ceo@bank.test>" to the reader whose client shows the display name.
"""

from __future__ import annotations

import pytest

from tests.harness import Mailsuite
from tests.smtp.test_submission import message, queued_events, remote_address, send, smtp

IMPERSONATING = {
    "unclosed-comment": "{own}(<ceo@bank.test>",
    "comment": "{own} (ceo@bank.test)",
    "display-name": '"ceo@bank.test" <{own}>',
    "quoted-local": '"ceo"@bank.test <{own}>',
    "encoded-word": "=?utf-8?b?Y2VvQGJhbmsudGVzdA==?= <{own}>",
    "fullwidth-at": "ceo\uff20bank.test <{own}>",
    "other-local-user": '"{other}" <{own}>',
}

HONEST = {
    "plain": "{own}",
    "name": "Alice Example <{own}>",
    "own-address-as-name": '"{own}" <{own}>',
    "comment": "{own} (at work)",
    "at-sign-in-words": '"Alice @ Home" <{own}>',
    "encoded-name": "=?utf-8?q?Al=C3=AFce?= <{own}>",
}


@pytest.mark.parametrize("from_header", IMPERSONATING.values(), ids=IMPERSONATING.keys())
def test_a_from_display_name_naming_another_address_is_553_5_7_1_and_nothing_is_kept(
        mailsuite: Mailsuite, from_header: str) -> None:
    domain = mailsuite.new_domain()
    address, other = mailsuite.new_account(domain), mailsuite.new_account(domain)
    rcpt, remote = mailsuite.new_account(domain), remote_address()
    raw = message(from_header.format(own=address, other=other), rcpt, body="impersonating")
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, address, [rcpt, remote], raw)
        assert (code, text.split()[0]) == (553, "5.7.1"), text
        code, text = send(client, address, [rcpt], message(address, rcpt, body="honest"))
        assert code == 250, text
    [stored] = mailsuite.inbox(rcpt)
    assert b"honest" in stored and b"impersonating" not in stored
    assert queued_events(mailsuite, sender=address) == []


@pytest.mark.parametrize("from_header", HONEST.values(), ids=HONEST.keys())
def test_a_from_display_name_without_another_address_is_sent(
        mailsuite: Mailsuite, from_header: str) -> None:
    address = mailsuite.new_account()
    rcpt = mailsuite.new_account()
    raw = message(from_header.format(own=address), rcpt, body="honest")
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, address, [rcpt], raw)
    assert code == 250, text
    [stored] = mailsuite.inbox(rcpt)
    assert b"honest" in stored


def test_a_display_name_may_show_another_address_the_user_may_send_as(
        mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    address, rcpt = mailsuite.new_account(domain), mailsuite.new_account(domain)
    alias = f"team@{domain}"
    mailsuite.store.alias_add(alias, [address])
    raw = message(f'"{alias}" <{address}>', rcpt, body="team")
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, address, [rcpt], raw)
    assert code == 250, text
