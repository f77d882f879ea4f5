"""DMARC policy applied by the MX (RFC 7489 6.6): p=reject refused after DATA, p=quarantine
filed into Junk, pct= sampling, the local override list, trusted ARC sealers, and the 451
for temporary DNS failures where p=reject could apply.

Mail comes from 127.0.0.1; the sender domains are in tests/conftest.py (sender_zones).
"""

from __future__ import annotations

import imaplib
import smtplib
from collections.abc import Callable

import dkim
import pytest

from mailsuite.config import MXConfig
from mailsuite.smtp import authresults
from mailsuite.smtp.mx import dmarc_action
from tests.harness import Mailsuite
from tests.smtp.test_mx_auth_results import SIGNED_HEADERS, make_message, one, our_results
from tests.smtp.test_submission import tls_context


def send(server: Mailsuite, message: bytes, mail_from: str) -> tuple[int, str, str]:
    """(code, text) of the reply to the message, and the fresh recipient it went to."""
    recipient = server.new_account()
    with smtplib.SMTP(*server.mx, local_hostname="client.test", timeout=30) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.mail(mail_from)[0] == 250
        assert smtp.rcpt(recipient)[0] == 250
        code, text = smtp.data(message)
    return code, text.decode("utf-8", "replace"), recipient


def mailboxes(server: Mailsuite, recipient: str) -> dict[str, list[bytes]]:
    return {name: server.inbox(recipient) if name == "INBOX" else
            [m.raw for m in server.store.messages(recipient, name)]
            for name in ("INBOX", "Junk")}


def events(server: Mailsuite, kind: str, **match: object) -> list[dict]:
    return [e.detail for e in server.store.events(kind, limit=100000)
            if all(e.detail.get(k) == v for k, v in match.items())]


def assert_rejected(server: Mailsuite, message: bytes, mail_from: str, domain: str) -> None:
    code, text, recipient = send(server, message, mail_from)
    assert (code, text[:5]) == (550, "5.7.1"), text
    assert domain in text
    assert mailboxes(server, recipient) == {"INBOX": [], "Junk": []}
    [event] = events(server, "rejected", recipients=[recipient])
    assert event["reason"] == "dmarc" and event["code"] == 550
    assert event["from_domain"] == domain and event["dmarc_policy"] == "reject"


def assert_filed(server: Mailsuite, message: bytes, mail_from: str, mailbox: str) -> dict:
    """The message is accepted and filed into `mailbox` only; returns our verdicts."""
    code, text, recipient = send(server, message, mail_from)
    assert code == 250, text
    stored = mailboxes(server, recipient)
    other = "Junk" if mailbox == "INBOX" else "INBOX"
    assert len(stored[mailbox]) == 1 and stored[other] == [], stored
    header = our_results(stored[mailbox][0], message)
    kind = "quarantined" if mailbox == "Junk" else "received"
    [event] = [e for e in events(server, kind) if e.get("recipients") == [recipient]]
    assert event["mailbox"] == mailbox
    return {"header": header, "event": event}


# --- p=reject and p=quarantine ---------------------------------------------------------------
def test_p_reject_failure_is_refused_after_data_and_nothing_is_stored(
        mailsuite: Mailsuite) -> None:
    assert_rejected(mailsuite, make_message("boss@spf-fail.test"), "boss@spf-fail.test",
                    "spf-fail.test")


def test_p_reject_pass_is_delivered_to_the_inbox(mailsuite: Mailsuite) -> None:
    found = assert_filed(mailsuite, make_message("boss@spf-pass.test"), "boss@spf-pass.test",
                         "INBOX")
    assert one(found["header"], "dmarc")[0] == "pass"


def test_p_quarantine_failure_is_filed_into_junk_and_counted(mailsuite: Mailsuite) -> None:
    found = assert_filed(mailsuite, make_message("news@dkim.test"), "news@dkim.test", "Junk")
    assert one(found["header"], "dmarc") == ("fail", {"header.from": "dkim.test",
                                                      "policy.dmarc": "quarantine"})
    assert found["event"]["dmarc"] == "fail" and found["event"]["from_domain"] == "dkim.test"


def test_sp_applies_to_a_subdomain_without_its_own_record(mailsuite: Mailsuite) -> None:
    # org-reject.test says p=reject; sp=quarantine: mail from a subdomain is filed away.
    found = assert_filed(mailsuite, make_message("boss@sub.org-reject.test"),
                         "sender@nothing.test", "Junk")
    assert one(found["header"], "dmarc") == ("fail", {"header.from": "sub.org-reject.test",
                                                      "policy.dmarc": "quarantine"})


@pytest.mark.parametrize("froms", [
    b"From: <boss@spf-fail.test>\r\nFrom: <news@nothing.test>\r\n",
    b"From: <boss@spf-fail.test>, <news@nothing.test>\r\n",
], ids=["two-fields", "two-addresses"])
def test_several_from_authors_are_refused(mailsuite: Mailsuite, froms: bytes) -> None:
    """Otherwise DMARC has no domain to judge (permerror) and p=reject is bypassed."""
    message = froms + make_message("x@nothing.test").split(b"\r\n", 1)[1]
    code, text, recipient = send(mailsuite, message, "news@nothing.test")
    assert (code, text[:5]) == (550, "5.7.1"), text
    assert mailboxes(mailsuite, recipient) == {"INBOX": [], "Junk": []}
    [event] = events(mailsuite, "rejected", recipients=[recipient])
    assert event["reason"] == "dmarc ambiguous from" and event["code"] == 550


def test_a_second_from_in_obsolete_syntax_is_refused_as_a_malformed_header(
        mailsuite: Mailsuite) -> None:
    """`From :` hides a second author from parsers that want no space before the colon; the
    header check refuses the message before DMARC is asked."""
    froms = b"From: <news@nothing.test>\r\nFrom : <boss@spf-fail.test>\r\n"
    message = froms + make_message("x@nothing.test").split(b"\r\n", 1)[1]
    code, text, recipient = send(mailsuite, message, "news@nothing.test")
    assert (code, text[:5]) == (554, "5.6.0"), text
    assert mailboxes(mailsuite, recipient) == {"INBOX": [], "Junk": []}


# --- pct (RFC 7489 6.6.4) --------------------------------------------------------------------
def test_pct_100_rejects(mailsuite: Mailsuite) -> None:
    assert_rejected(mailsuite, make_message("boss@reject-pct100.test"),
                    "boss@reject-pct100.test", "reject-pct100.test")


def test_pct_0_turns_reject_into_quarantine(mailsuite: Mailsuite) -> None:
    found = assert_filed(mailsuite, make_message("boss@reject-pct0.test"),
                         "boss@reject-pct0.test", "Junk")
    assert found["event"]["sampled_out"] is True


def test_pct_0_turns_quarantine_into_delivery(mailsuite: Mailsuite) -> None:
    found = assert_filed(mailsuite, make_message("boss@quarantine-pct0.test"),
                         "boss@quarantine-pct0.test", "INBOX")
    assert one(found["header"], "dmarc")[0] == "fail"


# --- overrides -------------------------------------------------------------------------------
def arc_sealed(private_pem: bytes, from_addr: str) -> bytes:
    """A message as a mailing list at lists.test forwards it: its own Authentication-Results
    (the original passed there) and an ARC set sealed with the test key."""
    message = (b"Authentication-Results: lists.test; spf=pass smtp.mailfrom=boss@spf-fail.test;"
               b" dmarc=pass header.from=spf-fail.test\r\n" + make_message(from_addr))
    seal = dkim.arc_sign(message, b"sel", b"lists.test", private_pem, b"lists.test",
                         include_headers=SIGNED_HEADERS)
    return b"".join(seal) + message


def test_a_trusted_arc_sealer_overrides_a_dmarc_reject(
        start_mailsuite: Callable[..., Mailsuite], dkim_key: tuple[bytes, str]) -> None:
    server = start_mailsuite({"mx": {"arc_trusted_sealers": "lists.test"}})
    sealed = arc_sealed(dkim_key[0], "boss@spf-fail.test")
    found = assert_filed(server, sealed, "list-bounces@spf-fail.test", "INBOX")
    assert one(found["header"], "arc")[0] == "pass"
    assert one(found["header"], "dmarc")[0] == "fail"
    assert found["event"]["override"] == "trusted forwarder"
    assert found["event"]["arc_sealer"] == "lists.test"


def test_an_untrusted_arc_sealer_does_not_override(mailsuite: Mailsuite,
                                                   dkim_key: tuple[bytes, str]) -> None:
    assert_rejected(mailsuite, arc_sealed(dkim_key[0], "boss@spf-fail.test"),
                    "list-bounces@spf-fail.test", "spf-fail.test")


def test_the_local_override_list_accepts_failures_of_its_domains(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"mx": {"dmarc_exempt": "spf-fail.test, dkim.test"}})
    for from_addr in ("boss@spf-fail.test", "news@dkim.test", "x@sub.spf-fail.test"):
        found = assert_filed(server, make_message(from_addr), "someone@spf-fail.test", "INBOX")
        assert found["event"]["override"] == "local policy"
    assert_rejected(server, make_message("boss@reject-pct100.test"), "boss@reject-pct100.test",
                    "reject-pct100.test")


def test_enforcement_can_be_turned_off(start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"mx": {"dmarc_enforce": False}})
    for from_addr in ("boss@spf-fail.test", "news@dkim.test"):
        found = assert_filed(server, make_message(from_addr), from_addr, "INBOX")
        assert one(found["header"], "dmarc")[0] == "fail"
    assert events(server, "rejected") == []


# --- where Junk went -------------------------------------------------------------------------
def test_quarantine_follows_a_renamed_junk_folder_and_falls_back_to_the_inbox(
        mailsuite: Mailsuite) -> None:
    code, text, recipient = send(mailsuite, make_message("boss@spf-pass.test"),
                                 "boss@spf-pass.test")
    assert code == 250, text
    with imaplib.IMAP4_SSL(*mailsuite.imaps, ssl_context=tls_context(), timeout=30) as imap:
        imap.login(recipient, "correct horse")
        assert imap.rename("Junk", "Spam")[0] == "OK"
    quarantine = make_message("news@dkim.test")

    def deliver_once() -> None:
        with smtplib.SMTP(*mailsuite.mx, local_hostname="client.test", timeout=30) as smtp:
            assert smtp.ehlo()[0] == 250
            assert smtp.mail("news@dkim.test")[0] == 250
            assert smtp.rcpt(recipient)[0] == 250
            assert smtp.data(quarantine)[0] == 250

    deliver_once()
    spam = [m.raw for m in mailsuite.store.messages(recipient, "Spam")]
    assert len(spam) == 1 and our_results(spam[0], quarantine)
    with imaplib.IMAP4_SSL(*mailsuite.imaps, ssl_context=tls_context(), timeout=30) as imap:
        imap.login(recipient, "correct horse")
        assert imap.delete("Spam")[0] == "OK"
    deliver_once()
    inbox = mailsuite.inbox(recipient)
    assert len(inbox) == 2 and our_results(inbox[1], quarantine)


# --- temporary DNS failures (451 4.4.3) ------------------------------------------------------
def dkim_signed_by(domain: str, private_pem: bytes, from_addr: str) -> bytes:
    message = make_message(from_addr)
    return dkim.sign(message, b"sel", domain.encode(), private_pem,
                     include_headers=SIGNED_HEADERS) + message


def assert_deferred(server: Mailsuite, message: bytes, mail_from: str) -> None:
    code, text, recipient = send(server, message, mail_from)
    assert (code, text[:5]) == (451, "4.4.3"), text
    assert mailboxes(server, recipient) == {"INBOX": [], "Junk": []}
    [event] = events(server, "rejected", recipients=[recipient])
    assert event["reason"] == "dmarc temperror" and event["code"] == 451


def test_spf_temperror_where_p_reject_applies_is_deferred(mailsuite: Mailsuite) -> None:
    assert_deferred(mailsuite, make_message("boss@spf-fail.test"), "boss@servfail.test")


def test_spf_timeout_where_the_dmarc_record_cannot_be_fetched_is_deferred(
        mailsuite: Mailsuite) -> None:
    assert_deferred(mailsuite, make_message("boss@servfail.test"), "boss@timeout.test")


def test_dkim_temperror_where_p_reject_applies_is_deferred(
        mailsuite: Mailsuite, dkim_key: tuple[bytes, str]) -> None:
    signed = dkim_signed_by("servfail.test", dkim_key[0], "boss@spf-fail.test")
    assert_deferred(mailsuite, signed, "boss@spf-fail.test")


def test_spf_temperror_without_a_reject_policy_is_accepted_and_recorded(
        mailsuite: Mailsuite) -> None:
    for from_addr, mailbox in (("news@monitor.test", "INBOX"), ("news@dkim.test", "Junk"),
                               ("x@nothing.test", "INBOX")):
        found = assert_filed(mailsuite, make_message(from_addr), "x@servfail.test", mailbox)
        assert one(found["header"], "spf")[0] == "temperror"


def test_dns_trouble_does_not_defer_a_message_that_passes_dmarc(
        mailsuite: Mailsuite, dkim_key: tuple[bytes, str]) -> None:
    # SPF cannot be checked, but the aligned DKIM signature passes: nothing to retry for.
    signed = dkim_signed_by("monitor.test", dkim_key[0], "news@monitor.test")
    found = assert_filed(mailsuite, signed, "x@timeout.test", "INBOX")
    assert one(found["header"], "dmarc")[0] == "pass"


def test_without_enforcement_temperror_is_accepted(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"mx": {"dmarc_enforce": False}})
    found = assert_filed(server, make_message("boss@spf-fail.test"), "boss@servfail.test",
                         "INBOX")
    assert one(found["header"], "spf")[0] == "temperror"


def test_pct_sampling_at_its_edges() -> None:
    """Without a server: the roll is the only chance involved."""
    def verdict(policy: str, pct: int) -> authresults.Verdict:
        spf = authresults.SPFOutcome("fail", "")
        return authresults.Verdict("", spf, (), authresults.ARCOutcome("none"),
                                   authresults.DMARCOutcome("fail", "x.test", policy, pct), ())

    config = MXConfig()
    assert dmarc_action(verdict("reject", 50), config, 0.49).kind == "reject"
    assert dmarc_action(verdict("reject", 50), config, 0.5).kind == "quarantine"
    assert dmarc_action(verdict("quarantine", 50), config, 0.5).kind == "accept"
    assert dmarc_action(verdict("reject", 100), config, 0.999).kind == "reject"
    assert dmarc_action(verdict("reject", 0), config, 0.0).kind == "quarantine"
    assert dmarc_action(verdict("none", 100), config, 0.0).kind == "accept"
