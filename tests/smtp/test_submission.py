"""Message submission (RFC 6409, RFC 8314) with SMTP AUTH (RFC 4954): who may send, as whom,
and what the server adds to what it accepts."""

from __future__ import annotations

import base64
import contextlib
import email.utils
import re
import secrets
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import dkim
import pytest
from sqlalchemy import insert

from mailsuite.dkim import DKIMKey, generate_key, public_record
from mailsuite.store import schema as t
from tests.dnsserver import DNSServerHandle
from tests.harness import TEST_HOSTNAME, Mailsuite, own_server
from tests.smtp.smtp_client import RawSMTP

PASSWORD = "correct horse"
REMOTE_DOMAIN = "nowhere.example"  # no DNS: queued mail to it bounces later, which is fine
QUEUED_RE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]{12})")


@pytest.fixture(scope="module")
def plain_server(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """A server of this module's own that takes AUTH without TLS."""
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "submission-plain", {"auth": {"allow_plaintext": True}})


# --------------------------------------------------------------------------- helpers
def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False  # the test server's certificate is self-signed
    context.verify_mode = ssl.CERT_NONE
    return context


@contextlib.contextmanager
def smtp(server: Mailsuite, via: str = "starttls", user: str | None = None,
         password: str = PASSWORD) -> Iterator[smtplib.SMTP]:
    """An smtplib session: via "plain" or "starttls" (submission port) or "implicit"
    (submissions port); logged in with AUTH PLAIN when `user` is given."""
    if via == "implicit":
        client: smtplib.SMTP = smtplib.SMTP_SSL(*server.submissions, local_hostname="client.test",
                                                timeout=5, context=tls_context())
    else:
        client = smtplib.SMTP(*server.submission, local_hostname="client.test", timeout=5)
    try:
        client.ehlo()
        if via == "starttls":
            assert client.starttls(context=tls_context())[0] == 220
            client.ehlo()
        if user is not None:
            client.user, client.password = user, password
            assert client.auth("PLAIN", client.auth_plain)[0] == 235
        yield client
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


def raw_tls(server: Mailsuite) -> RawSMTP:
    """A raw session on the submission port, after STARTTLS and a second EHLO."""
    client = RawSMTP(server.submission)
    assert client.greeting()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    assert client.cmd("STARTTLS")[0] == 220
    client.starttls()
    assert client.cmd("EHLO client.test")[0] == 250
    return client


def plain_response(authzid: str, user: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode("ascii")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def ehlo_keywords(text: str) -> list[str]:
    """The extension lines of an EHLO reply (the first line is the greeting)."""
    return text.split("\n")[1:]


def message(sender: str, to: str, subject: str = "hello", body: str = "a body line",
            extra: tuple[str, ...] = ()) -> bytes:
    lines = [f"From: {sender}", f"To: {to}", f"Subject: {subject}", *extra, "", body, ""]
    return "\r\n".join(lines).encode()


def send(client: smtplib.SMTP, sender: str, recipients: list[str], raw: bytes) -> tuple[int, str]:
    """MAIL and RCPT, each of which must be accepted, then DATA: its (code, text)."""
    assert client.mail(sender)[0] == 250
    for recipient in recipients:
        code, text = client.rcpt(recipient)
        assert code == 250, (recipient, code, text)
    code, reply = client.data(raw)
    return code, reply.decode()


def queue_id(text: str) -> str:
    match = QUEUED_RE.fullmatch(text)
    assert match, f"250 text does not end with a queue id: {text!r}"
    return match.group(1)


def remote_address() -> str:
    return f"r{secrets.token_hex(4)}@{REMOTE_DOMAIN}"


def queued_events(server: Mailsuite, **match: object) -> list[dict]:
    return [e.detail for e in server.store.events("queued", limit=100000)
            if all(e.detail.get(k) == v for k, v in match.items())]


def field_values(raw: bytes, name: str) -> list[bytes]:
    header = re.sub(rb"\r\n[ \t]", b" ", raw.split(b"\r\n\r\n", 1)[0])  # unfolded
    prefix = name.lower().encode() + b":"
    return [line[len(prefix):].strip() for line in header.split(b"\r\n")
            if line.lower().startswith(prefix)]


def forget_failures(server: Mailsuite) -> None:
    """A successful login clears the failure count the server keeps for 127.0.0.1."""
    with smtp(server, user=server.new_account()):
        pass


# =========================================================================== EHLO, STARTTLS
def test_ehlo_before_tls_offers_starttls_and_no_auth(mailsuite: Mailsuite) -> None:
    client = RawSMTP(mailsuite.submission)
    assert client.greeting()[0] == 220
    code, text = client.cmd("EHLO client.test")
    assert code == 250
    keywords = ehlo_keywords(text)
    assert "STARTTLS" in keywords, text
    assert not any(k.upper().startswith("AUTH") for k in keywords), text
    client.close()


def test_after_starttls_ehlo_offers_auth_plain_login_and_no_starttls(
        mailsuite: Mailsuite) -> None:
    client = raw_tls(mailsuite)
    code, text = client.cmd("EHLO client.test")
    assert code == 250
    keywords = ehlo_keywords(text)
    assert "AUTH PLAIN LOGIN" in keywords, text
    assert "STARTTLS" not in keywords, text
    client.close()


def test_implicit_tls_port_offers_auth_at_once_and_takes_a_login(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with smtp(mailsuite, via="implicit") as client:
        assert client.esmtp_features.get("auth", "").split() == ["PLAIN", "LOGIN"]
        assert "starttls" not in client.esmtp_features
        client.user, client.password = address, PASSWORD
        assert client.auth("LOGIN", client.auth_login)[0] == 235


def test_starttls_discards_commands_pipelined_in_plaintext(mailsuite: Mailsuite) -> None:
    # RFC 3207 4.2: an AUTH injected behind STARTTLS must not log the session in.
    address = mailsuite.new_account()
    client = RawSMTP(mailsuite.submission)
    assert client.greeting()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    client.send(f"STARTTLS\r\nAUTH PLAIN {plain_response('', address, PASSWORD)}\r\n".encode())
    assert client.reply()[0] == 220
    client.starttls()
    assert client.cmd("EHLO client.test")[0] == 250
    code, text = client.cmd(f"MAIL FROM:<{address}>")
    assert (code, text.split()[0]) == (530, "5.7.0"), text
    client.close()


# =========================================================================== AUTH
def test_auth_before_tls_is_538_5_7_11_encryption_required(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    client = RawSMTP(mailsuite.submission)
    assert client.greeting()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    for command in (f"AUTH PLAIN {plain_response('', address, PASSWORD)}", "AUTH LOGIN"):
        code, text = client.cmd(command)
        assert (code, text.split()[0]) == (538, "5.7.11"), (command, text)
    # Nothing was logged in by the refused attempts.
    code, text = client.cmd(f"MAIL FROM:<{address}>")
    assert (code, text.split()[0]) == (530, "5.7.0"), text
    client.close()


def test_mail_before_auth_is_530_5_7_0_authentication_required(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    client = raw_tls(mailsuite)
    code, text = client.cmd(f"MAIL FROM:<{address}>")
    assert (code, text.split()[0]) == (530, "5.7.0"), text
    assert client.cmd(f"RCPT TO:<{address}>")[0] == 503  # no transaction was opened
    client.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("initial_response", [True, False], ids=["initial", "challenge"])
def test_auth_with_the_right_password_is_235_and_a_second_auth_is_503(
        mailsuite: Mailsuite, mechanism: str, initial_response: bool) -> None:
    address = mailsuite.new_account()
    with smtp(mailsuite) as client:
        client.user, client.password = address, PASSWORD
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, text = client.auth(mechanism, authobject, initial_response_ok=initial_response)
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        # RFC 4954 4: after a successful AUTH, further AUTH commands get 503.
        assert client.docmd("AUTH", f"PLAIN {plain_response('', address, PASSWORD)}")[0] == 503
        assert "auth" not in client.ehlo()[1].decode().lower()
        assert client.mail(address)[0] == 250


def test_wrong_password_is_535_5_7_8_after_a_delay_that_grows(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    forget_failures(mailsuite)  # the penalty is per client address: start from zero
    client = raw_tls(mailsuite)
    delays = []
    for attempt in ("wrong horse", "wrong again"):
        start = time.monotonic()
        code, text = client.cmd(f"AUTH PLAIN {plain_response('', address, attempt)}")
        delays.append(time.monotonic() - start)
        assert (code, text.split()[0]) == (535, "5.7.8"), text
    assert delays[0] >= 0.4, f"first failure answered after {delays[0]:.3f}s: no delay"
    assert delays[1] > delays[0] + 0.25, delays
    # Still not logged in; and the right password works afterwards in the same session.
    assert client.cmd(f"MAIL FROM:<{address}>")[0] == 530
    assert client.cmd(f"AUTH PLAIN {plain_response('', address, PASSWORD)}")[0] == 235
    client.close()


def test_plain_with_another_users_authzid_is_refused_501(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    attacker, victim = mailsuite.new_account(domain), mailsuite.new_account(domain)
    client = raw_tls(mailsuite)
    code, text = client.cmd(f"AUTH PLAIN {plain_response(victim, attacker, PASSWORD)}")
    assert code == 501, text
    code, text = client.cmd(f"MAIL FROM:<{victim}>")
    assert (code, text.split()[0]) == (530, "5.7.0"), text
    # An authorization identity that is the user itself is no impersonation.
    assert client.cmd(f"AUTH PLAIN {plain_response(attacker, attacker, PASSWORD)}")[0] == 235
    client.close()


def test_auth_cancelled_with_a_star_is_501_and_the_session_goes_on(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    client = raw_tls(mailsuite)
    # RFC 4954 4: "*" cancels the exchange at any step.
    for steps in (["AUTH PLAIN"], ["AUTH LOGIN"], ["AUTH LOGIN", b64(address)]):
        for step in steps:
            assert client.cmd(step)[0] == 334, step
        code, text = client.cmd("*")
        assert code == 501, (steps, text)
        assert client.cmd(f"MAIL FROM:<{address}>")[0] == 530
    assert client.cmd("AUTH LOGIN")[0] == 334
    assert client.cmd(b64(address))[0] == 334
    assert client.cmd(b64(PASSWORD))[0] == 235
    client.close()


def test_with_allow_plaintext_auth_works_without_tls(plain_server: Mailsuite) -> None:
    address = plain_server.new_account()
    with smtp(plain_server, via="plain") as client:
        assert client.esmtp_features.get("auth", "").split() == ["PLAIN", "LOGIN"]
        client.user, client.password = address, PASSWORD
        assert client.auth("LOGIN", client.auth_login)[0] == 235
        code, text = send(client, address, [address],
                          message(address, address, body="sent in the clear"))
        assert code == 250, text
    [stored] = plain_server.inbox(address)
    assert f" with ESMTPA id {queue_id(text)}".encode() in stored  # no S: no TLS


# =========================================================================== local delivery
def test_submission_to_a_local_account_is_stored_with_date_message_id_received_and_return_path(
        mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    sender, rcpt = mailsuite.new_account(domain), mailsuite.new_account(domain)
    raw = message(sender, rcpt, subject="no date, no id", body="complete me")
    with smtp(mailsuite, user=sender) as client:
        code, text = send(client, sender, [rcpt], raw)
    assert code == 250, text
    qid = queue_id(text)
    [stored] = mailsuite.inbox(rcpt)
    assert stored.startswith(
        f"Return-Path: <{sender}>\r\n"
        f"Received: from client.test ([127.0.0.1])\r\n"
        f"\tby {TEST_HOSTNAME} (mailsuite) with ESMTPSA id {qid}\r\n"
        f"\tfor <{rcpt}>;".encode()), stored[:300]
    # RFC 6409 8.2, 8.3: the submission server adds a missing Date and Message-ID.
    [date] = field_values(stored, "Date")
    sent_at = email.utils.parsedate_to_datetime(date.decode())
    if sent_at.tzinfo is None:  # "-0000": UTC, with no word on the local zone (RFC 5322 3.3)
        sent_at = sent_at.replace(tzinfo=UTC)
    assert abs((sent_at - datetime.now(UTC)).total_seconds()) < 300, date
    [message_id] = field_values(stored, "Message-ID")
    assert re.fullmatch(rb"<[^<>@\s]+@[^<>@\s]+>", message_id), message_id
    assert stored.endswith(raw), stored  # the client's own header and body unchanged
    assert not field_values(stored, "DKIM-Signature")  # the domain has no key


def test_message_with_its_own_date_and_message_id_keeps_them_unchanged(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    date = "Mon, 02 Nov 2026 10:00:00 +0100"
    message_id = f"<{secrets.token_hex(8)}@client.test>"
    raw = message(address, address, extra=(f"Date: {date}", f"Message-ID: {message_id}"))
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, address, [address], raw)
    assert code == 250, text
    [stored] = mailsuite.inbox(address)
    assert field_values(stored, "Date") == [date.encode()]
    assert field_values(stored, "Message-ID") == [message_id.encode()]
    assert stored.endswith(raw)


def test_unknown_local_user_gets_550_5_1_1_at_rcpt_time(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    domain = address.rpartition("@")[2]
    with smtp(mailsuite, user=address) as client:
        assert client.mail(address)[0] == 250
        code, text = client.rcpt(f"nobody@{domain}")
        assert (code, text.split()[0]) == (550, b"5.1.1"), text


# =========================================================================== sender policy
@pytest.mark.parametrize("who", ["local user", "remote address"])
def test_mail_from_someone_elses_address_is_553_5_7_1(mailsuite: Mailsuite, who: str) -> None:
    domain = mailsuite.new_domain()
    address = mailsuite.new_account(domain)
    other = mailsuite.new_account(domain) if who == "local user" else remote_address()
    with smtp(mailsuite, user=address) as client:
        code, text = client.mail(other)
        assert (code, text.split()[0]) == (553, b"5.7.1"), text
        assert client.rcpt(address)[0] == 503  # no transaction was opened


def test_null_reverse_path_is_refused_553_at_mail(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with smtp(mailsuite, user=address) as client:
        code, text = client.mail("")
        assert (code, text.split()[0]) == (553, b"5.7.1"), text


def test_mail_from_an_alias_of_the_account_is_accepted(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    address = mailsuite.new_account(domain)
    alias = f"alias{secrets.token_hex(3)}@{domain}"
    mailsuite.store.alias_add(alias, [address])
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, alias, [address], message(alias, address, body="as my alias"))
    assert code == 250, text
    [stored] = mailsuite.inbox(address)
    assert stored.startswith(f"Return-Path: <{alias}>\r\n".encode())
    assert field_values(stored, "From") == [alias.encode()]


def test_a_catch_all_to_the_account_is_no_licence_to_send_as_anyone_there(
        mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    address = mailsuite.new_account(domain)
    mailsuite.store.alias_add(f"@{domain}", [address])
    with smtp(mailsuite, user=address) as client:
        code, text = client.mail(f"anyone@{domain}")
        assert (code, text.split()[0]) == (553, b"5.7.1"), text


def test_a_granted_domain_may_be_used_in_mail_from_and_from(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    granted = f"g{secrets.token_hex(4)}.example"
    mailsuite.store.grant_add(address, granted)  # before login: identities are read then
    sender = f"newsletter@{granted}"
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, sender, [address], message(sender, address))
        assert code == 250, text
        code, text = client.mail(f"newsletter@not-{granted}")
        assert (code, text.split()[0]) == (553, b"5.7.1"), text
    [stored] = mailsuite.inbox(address)
    assert field_values(stored, "From") == [sender.encode()]


@pytest.mark.parametrize("from_header", ["{other}", "Me <{own}>, Other <{other}>"],
                         ids=["other", "own-and-other"])
def test_from_header_with_another_users_address_is_553_5_7_1_after_data_and_nothing_is_kept(
        mailsuite: Mailsuite, from_header: str) -> None:
    domain = mailsuite.new_domain()
    address, other = mailsuite.new_account(domain), mailsuite.new_account(domain)
    rcpt, remote = mailsuite.new_account(domain), remote_address()
    raw = message(from_header.format(own=address, other=other), rcpt, body="forged")
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, address, [rcpt, remote], raw)
        assert (code, text.split()[0]) == (553, "5.7.1"), text
        assert other in text
        # The session goes on: an honest message is taken after the refused one.
        code, text = send(client, address, [rcpt], message(address, rcpt, body="honest"))
        assert code == 250, text
    [stored] = mailsuite.inbox(rcpt)
    assert b"honest" in stored and b"forged" not in stored
    assert queued_events(mailsuite, sender=address) == []


@pytest.mark.parametrize("header", ["", "From: undisclosed\r\n"], ids=["no-from", "no-address"])
def test_message_without_a_from_address_is_550_5_6_0(mailsuite: Mailsuite, header: str) -> None:
    address = mailsuite.new_account()
    raw = f"{header}To: {address}\r\nSubject: who am I\r\n\r\nanonymous\r\n".encode()
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, address, [address], raw)
    assert (code, text.split()[0]) == (550, "5.6.0"), text
    assert mailsuite.inbox(address) == []


# =========================================================================== remote delivery
def test_remote_recipient_is_queued_under_the_queue_id_of_the_250_reply(
        mailsuite: Mailsuite) -> None:
    address, remote = mailsuite.new_account(), remote_address()
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, address, [remote], message(address, remote))
    assert code == 250, text
    # The 250 comes after the commit, so the event is there already.
    [event] = queued_events(mailsuite, queue_id=queue_id(text))
    assert event["sender"] == address
    assert event["recipients"] == [remote]
    assert event["kind"] == "submission"
    assert event["user"] == address


def test_local_and_remote_recipients_of_one_message_share_its_queue_id(
        mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    address, rcpt = mailsuite.new_account(domain), mailsuite.new_account(domain)
    remote = remote_address()
    with smtp(mailsuite, user=address) as client:
        code, text = send(client, address, [rcpt, remote], message(address, rcpt))
    assert code == 250, text
    qid = queue_id(text)
    [stored] = mailsuite.inbox(rcpt)
    assert f" with ESMTPSA id {qid}".encode() in stored.split(b"\r\n\r\n", 1)[0]
    [event] = queued_events(mailsuite, queue_id=qid)
    assert event["recipients"] == [remote]  # the local one is not queued
    assert event["sender"] == address


def test_suppressed_remote_address_is_refused_550_5_7_1_at_rcpt(mailsuite: Mailsuite) -> None:
    address, suppressed, other = mailsuite.new_account(), remote_address(), remote_address()
    with mailsuite.store.db.write() as conn:
        conn.execute(insert(t.suppressions).values(address=suppressed, reason="550 5.1.1 gone",
                                                   created_at=datetime.now(UTC)))
    with smtp(mailsuite, user=address) as client:
        assert client.mail(address)[0] == 250
        code, text = client.rcpt(suppressed)
        assert (code, text.split()[0]) == (550, b"5.7.1"), text
        assert b"suppress" in text.lower()
        assert client.rcpt(other)[0] == 250  # only that address is refused


# =========================================================================== DKIM
def test_message_from_a_domain_with_a_key_is_dkim_signed_and_verifies(
        mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    address = mailsuite.new_account(domain)
    key: DKIMKey = generate_key(domain)
    mailsuite.store.dkim_key_add(domain, key.selector, key.algorithm, key.private_key)
    record = public_record(key).encode()
    name = f"{key.selector}._domainkey.{domain}.".encode()

    def dnsfunc(query: bytes, timeout: int = 5) -> bytes | None:
        return record if query == name else None

    with smtp(mailsuite, user=address) as client:
        code, text = send(client, address, [address], message(address, address, body="signed"))
    assert code == 250, text
    [stored] = mailsuite.inbox(address)
    [signature] = field_values(stored, "DKIM-Signature")
    tags = dkim.util.parse_tag_value(re.sub(rb"\s+", b"", signature))
    assert (tags[b"d"], tags[b"s"]) == (domain.encode(), key.selector.encode())
    signed = tags[b"h"].lower().split(b":")
    # The Date and Message-ID we added are covered by the signature.
    assert {b"from", b"date", b"message-id"} <= set(signed), signed
    # Return-Path and Received come after signing and are not signed: the copy verifies.
    assert dkim.verify(stored, dnsfunc=dnsfunc), stored[:2000]


# =========================================================================== PIPELINING
def test_pipelined_mail_rcpt_data_get_their_replies_in_order(plain_server: Mailsuite) -> None:
    # RFC 2920 3.1: MAIL, RCPT and DATA may go in one group; the replies come in order.
    domain = plain_server.new_domain()
    address, rcpt = plain_server.new_account(domain), plain_server.new_account(domain)
    client = RawSMTP(plain_server.submission)
    assert client.greeting()[0] == 220
    code, text = client.cmd("EHLO client.test")
    assert code == 250 and "PIPELINING" in ehlo_keywords(text), text
    assert client.cmd(f"AUTH PLAIN {plain_response('', address, PASSWORD)}")[0] == 235
    client.send(f"MAIL FROM:<{address}>\r\nRCPT TO:<{rcpt}>\r\nRCPT TO:<nobody@{domain}>\r\n"
                "DATA\r\n".encode())
    replies = [client.reply() for _ in range(4)]
    assert [code for code, _ in replies] == [250, 250, 550, 354], replies
    client.send(message(address, rcpt, body="pipelined") + b".\r\nQUIT\r\n")
    code, text = client.reply()
    assert code == 250, text
    assert client.reply()[0] == 221
    client.close()
    [stored] = plain_server.inbox(rcpt)
    assert f" with ESMTPA id {queue_id(text)}".encode() in stored
    assert stored.endswith(b"\r\n\r\npipelined\r\n")


def test_a_second_from_in_obsolete_syntax_is_refused_not_overlooked(mailsuite: Mailsuite) -> None:
    """RFC 5322 4.5 lets receivers read "From :" as From: a forged second one must not pass
    the sender check hidden behind the account's own."""
    user = mailsuite.new_account()
    victim = mailsuite.new_account()
    before = len(mailsuite.inbox(victim))
    raw = (f"From: {user}\r\nFrom : <{victim}>\r\nTo: {victim}\r\nSubject: x\r\n\r\n"
           "body\r\n").encode()
    with smtp(mailsuite, user=user) as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail(user, [victim], raw)
    # Refused as malformed while DATA streams in (obsolete syntax is not accepted at all).
    assert refused.value.smtp_code == 554
    assert b"5.6.0" in refused.value.smtp_error
    assert len(mailsuite.inbox(victim)) == before


def test_rcpts_pipelined_behind_a_refused_mail_get_503_without_ending_the_session(
        plain_server: Mailsuite) -> None:
    """RFC 2920: the client could not know MAIL would fail; its RCPTs are not junk."""
    user = plain_server.new_account()
    other = plain_server.new_account()
    client = RawSMTP(plain_server.submission)
    assert client.greeting()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    token = base64.b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
    assert client.cmd(f"AUTH PLAIN {token}")[0] == 235
    rcpts = "".join(f"RCPT TO:<r{i}@{REMOTE_DOMAIN}>\r\n" for i in range(30))
    client.send(f"MAIL FROM:<{other}>\r\n{rcpts}DATA\r\n".encode())
    assert client.reply()[0] == 553
    assert [client.reply()[0] for _ in range(31)] == [503] * 31
    assert client.cmd("NOOP")[0] == 250  # still talking to us
    client.close()
