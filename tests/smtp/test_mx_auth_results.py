"""Authentication-Results of the inbound MX (RFC 8601): SPF, DKIM, ARC and DMARC verdicts.

Every message is sent from 127.0.0.1 through the loopback DNS server of conftest.py, and the
verdicts are read back from the stored message: exactly one Authentication-Results naming our
authserv-id, right after the trace fields we add, and the rest of the message byte-exact.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import re
import secrets
import smtplib
import time
from collections.abc import Callable

import authres
import dkim
import pytest

from tests.harness import TEST_HOSTNAME, Mailsuite

RECIPIENT_HEADER = "rcpt@mailsuite.test"
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date"]


# --- building and sending --------------------------------------------------------------------
def make_message(from_addr: str, *, extra: bytes = b"", body: bytes = b"Hello there.\r\n") -> bytes:
    """A CRLF message; `extra` holds whole header fields placed before From."""
    head = (
        f"From: Sender <{from_addr}>\r\n"
        f"To: <{RECIPIENT_HEADER}>\r\n"
        f"Subject: auth results {secrets.token_hex(4)}\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        f"Message-ID: <{secrets.token_hex(8)}@client.test>\r\n"
    ).encode()
    return extra + head + b"\r\n" + body


def dkim_signed(private_pem: bytes, from_addr: str = "news@dkim.test") -> bytes:
    message = make_message(from_addr, body=b"Signed body line one.\r\nLine two.\r\n")
    return dkim.sign(message, b"sel", b"dkim.test", private_pem,
                     include_headers=SIGNED_HEADERS) + message


def deliver(server: Mailsuite, message: bytes, mail_from: str,
            helo: str = "client.test", mailbox: str = "INBOX") -> bytes:
    """Send one message to a fresh account, require 250 at every step, return it as stored
    (in `mailbox`: Junk for a p=quarantine failure)."""
    recipient = server.new_account()
    with smtplib.SMTP(*server.mx, local_hostname=helo, timeout=30) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.mail(mail_from)[0] == 250
        assert smtp.rcpt(recipient)[0] == 250
        code, text = smtp.data(message)
        assert code == 250, text
    stored = [m.raw for m in server.store.messages(recipient, mailbox)]
    assert len(stored) == 1
    return stored[0]


# --- reading the stored message --------------------------------------------------------------
def header_fields(raw: bytes) -> list[bytes]:
    """The header fields of a message, each whole (folded lines and final CRLF included)."""
    end = raw.find(b"\r\n\r\n")
    assert end >= 0, raw[:200]
    fields: list[bytes] = []
    for line in raw[: end + 2].split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def parse_ar(field: bytes) -> authres.AuthenticationResultsHeader | None:
    """The parsed Authentication-Results field, or None when it is not one (or unparsable)."""
    if field_name(field) != "authentication-results":
        return None
    text = re.sub(r"\r\n[ \t]", " ", field.decode("utf-8")).rstrip("\r\n")
    try:
        return authres.AuthenticationResultsHeader.parse(text)
    except authres.AuthResError:
        return None


def is_ours(field: bytes) -> bool:
    header = parse_ar(field)
    return header is not None and header.authserv_id.lower() == TEST_HOSTNAME


def split_stored(stored: bytes) -> tuple[authres.AuthenticationResultsHeader | None, bytes]:
    """(our parsed Authentication-Results or None, the message without what we added).

    The stored message must start with our Return-Path and Received, may carry at most one
    Authentication-Results naming us, as the first or second field after them.
    """
    fields = header_fields(stored)
    assert [field_name(f) for f in fields[:2]] == ["return-path", "received"], fields[:3]
    assert TEST_HOSTNAME.encode() in fields[1]
    ours = [i for i, f in enumerate(fields) if is_ours(f)]
    assert len(ours) <= 1, [fields[i] for i in ours]
    rest = stored[len(fields[0]) + len(fields[1]):]
    if not ours:
        return None, rest
    index = ours[0]
    assert index in (2, 3), f"our Authentication-Results is header field #{index}"
    header = parse_ar(fields[index])
    assert header is not None
    offset = sum(len(f) for f in fields[2:index])
    assert rest[offset:].startswith(fields[index])
    return header, rest[:offset] + rest[offset + len(fields[index]):]


def our_results(stored: bytes, sent: bytes | None = None) -> authres.AuthenticationResultsHeader:
    """Our one Authentication-Results; with `sent`, the rest must be exactly what was sent."""
    header, rest = split_stored(stored)
    assert header is not None, "no Authentication-Results naming " + TEST_HOSTNAME
    if sent is not None:
        assert rest == sent
    return header


def results(header: authres.AuthenticationResultsHeader, method: str) -> list[tuple[str, dict]]:
    """[(result, {"ptype.property": value})] of every result of one method."""
    return [(r.result.lower(), {f"{p.type}.{p.name}".lower(): p.value for p in r.properties})
            for r in header.results if r.method.lower() == method]


def one(header: authres.AuthenticationResultsHeader, method: str) -> tuple[str, dict]:
    found = results(header, method)
    assert len(found) == 1, (method, str(header))
    return found[0]


def check(server: Mailsuite, mail_from: str, from_addr: str,
          helo: str = "client.test") -> authres.AuthenticationResultsHeader:
    """Deliver a plain message and return our verdicts; the message must survive byte-exact."""
    message = make_message(from_addr)
    return our_results(deliver(server, message, mail_from, helo), message)


# --- SPF (RFC 7208) --------------------------------------------------------------------------
@pytest.mark.parametrize(("domain", "expected"), [
    ("spf-pass.test", "pass"),
    ("spf-fail.test", "fail"),
    ("softfail.test", "softfail"),
    ("nothing.test", "none"),
])
def test_spf_result_for_the_mail_from_domain_is_recorded_with_smtp_mailfrom(
        mailsuite: Mailsuite, domain: str, expected: str) -> None:
    # From a domain without DMARC: spf-fail.test's p=reject would refuse the message.
    header = check(mailsuite, f"sender@{domain}", "sender@nothing.test")
    result, props = one(header, "spf")
    assert result == expected, str(header)
    assert props.get("smtp.mailfrom") == f"sender@{domain}"
    assert "smtp.helo" not in props


def test_spf_servfail_is_temperror_and_the_message_is_still_accepted(
        mailsuite: Mailsuite) -> None:
    header = check(mailsuite, "sender@servfail.test", "sender@nothing.test")
    assert one(header, "spf") == ("temperror", {"smtp.mailfrom": "sender@servfail.test"})


def test_spf_dns_timeout_is_temperror_and_the_message_is_still_accepted(
        mailsuite: Mailsuite) -> None:
    header = check(mailsuite, "sender@timeout.test", "sender@nothing.test")
    assert one(header, "spf") == ("temperror", {"smtp.mailfrom": "sender@timeout.test"})


def test_a_dns_failure_does_not_break_the_session_for_the_next_transaction(
        mailsuite: Mailsuite) -> None:
    first, second = mailsuite.new_account(), mailsuite.new_account()
    with smtplib.SMTP(*mailsuite.mx, local_hostname="client.test", timeout=30) as smtp:
        assert smtp.ehlo()[0] == 250
        for recipient, sender in ((first, "a@timeout.test"), (second, "b@spf-pass.test")):
            assert smtp.mail(sender)[0] == 250
            assert smtp.rcpt(recipient)[0] == 250
            assert smtp.data(make_message("x@nothing.test"))[0] == 250
    assert one(our_results(mailsuite.inbox(first)[0]), "spf")[0] == "temperror"
    assert one(our_results(mailsuite.inbox(second)[0]), "spf")[0] == "pass"


@pytest.mark.parametrize(("helo", "expected"), [
    ("spf-pass.test", "pass"),
    ("spf-fail.test", "fail"),
])
def test_null_reverse_path_is_checked_with_the_helo_identity(
        mailsuite: Mailsuite, helo: str, expected: str) -> None:
    header = check(mailsuite, "", "mailer-daemon@nothing.test", helo=helo)
    assert one(header, "spf") == (expected, {"smtp.helo": helo})


# --- DKIM (RFC 6376) -------------------------------------------------------------------------
def test_dkim_valid_signature_passes_and_the_stored_message_still_verifies(
        mailsuite: Mailsuite, dkim_key: tuple[bytes, str]) -> None:
    private_pem, public = dkim_key
    signed = dkim_signed(private_pem)
    stored = deliver(mailsuite, signed, "news@spf-pass.test")
    header = our_results(stored, signed)
    result, props = one(header, "dkim")
    assert result == "pass", str(header)
    assert props.get("header.d") == "dkim.test"
    assert props.get("header.s") == "sel"

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        if name.rstrip(b".").lower() == b"sel._domainkey.dkim.test":
            return f"v=DKIM1; k=rsa; p={public}".encode()
        return None

    assert dkim.verify(stored, dnsfunc=dnsfunc)


def test_dkim_signature_over_a_changed_body_fails(
        mailsuite: Mailsuite, dkim_key: tuple[bytes, str]) -> None:
    signed = dkim_signed(dkim_key[0])
    tampered = signed.replace(b"Line two.", b"Line tw0.")
    assert tampered != signed
    # dkim.test asks for p=quarantine: the failure is filed into Junk.
    header = our_results(deliver(mailsuite, tampered, "news@dkim.test", mailbox="Junk"),
                         tampered)
    result, props = one(header, "dkim")
    assert result == "fail", str(header)
    assert props.get("header.d") == "dkim.test"
    # Neither SPF (dkim.test fails 127.0.0.1) nor the broken signature aligns.
    assert one(header, "dmarc")[0] == "fail"


@pytest.mark.parametrize("garbage", [
    b"DKIM-Signature: garbage\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=dkim.test; s=sel; b=AAAA\r\n",
], ids=["no-tag-list", "tags-missing"])
def test_dkim_garbage_signature_is_a_permerror_or_fail_and_the_message_is_accepted(
        mailsuite: Mailsuite, garbage: bytes) -> None:
    message = make_message("news@dkim.test", extra=garbage)
    # Nothing aligns: dkim.test's p=quarantine files the message into Junk.
    header = our_results(deliver(mailsuite, message, "news@spf-pass.test", mailbox="Junk"),
                         message)
    result, _ = one(header, "dkim")
    assert result in ("permerror", "fail"), str(header)


def test_dkim_is_none_without_a_signature(mailsuite: Mailsuite) -> None:
    header = check(mailsuite, "sender@spf-pass.test", "sender@spf-pass.test")
    assert one(header, "dkim") == ("none", {})


# --- what a signature earns (RFC 6376 5.4, RFC 8301, l=) ------------------------------------
def monitor_message(body: bytes = b"Signed body line one.\r\nLine two.\r\n") -> bytes:
    """From monitor.test: SPF fails from 127.0.0.1 and DMARC asks for nothing (p=none), so
    only an aligned DKIM pass can make DMARC pass and nothing is filed away."""
    return make_message("news@monitor.test", body=body)


def sign_monitor(message: bytes, private_pem: bytes, **options: object) -> bytes:
    return dkim.sign(message, b"sel", b"monitor.test", private_pem,
                     include_headers=SIGNED_HEADERS, **options) + message


def sign_without_from(message: bytes, private_pem: bytes) -> bytes:
    """A valid signature whose h= leaves From out; dkimpy refuses to make one, so it is
    assembled from its parts with dkimpy's own header hashing."""
    signer = dkim.DKIM(message)
    canon = dkim.canonicalization.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    body_hash = base64.b64encode(hashlib.sha256(canon.canonicalize_body(signer.body)).digest())
    fields = [(b"v", b"1"), (b"a", b"rsa-sha256"), (b"c", b"relaxed/relaxed"),
              (b"d", b"monitor.test"), (b"s", b"sel"), (b"t", str(int(time.time())).encode()),
              (b"h", b"to : subject : date"), (b"bh", body_hash), (b"b", b"0" * 60)]
    signer.hasher = hashlib.sha256
    value = signer.gen_header(fields, (b"to", b"subject", b"date"), canon, b"DKIM-Signature",
                              dkim.crypto.parse_pem_private_key(private_pem))
    return b"DKIM-Signature: " + value + message


def dkimpy_accepts(signed: bytes, public: str) -> bool:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return f"v=DKIM1; k=rsa; p={public}".encode()

    return dkim.verify(signed, dnsfunc=dnsfunc)


def test_dkim_aligned_signature_of_a_p_none_domain_passes_dmarc(
        mailsuite: Mailsuite, dkim_key: tuple[bytes, str]) -> None:
    """The control for the cases below: signed properly, the same message earns credit."""
    signed = sign_monitor(monitor_message(), dkim_key[0])
    header = our_results(deliver(mailsuite, signed, "news@monitor.test"), signed)
    assert one(header, "spf")[0] == "fail"
    assert one(header, "dkim")[0] == "pass"
    assert one(header, "dmarc") == ("pass", {"header.from": "monitor.test",
                                             "policy.dmarc": "none"})


def test_dkim_signature_that_does_not_sign_from_is_permerror_and_earns_no_alignment(
        mailsuite: Mailsuite, dkim_key: tuple[bytes, str]) -> None:
    signed = sign_without_from(monitor_message(), dkim_key[0])
    assert dkimpy_accepts(signed, dkim_key[1])  # cryptographically sound: only h= is wrong
    header = our_results(deliver(mailsuite, signed, "news@monitor.test"), signed)
    result, props = one(header, "dkim")
    assert result == "permerror", str(header)
    assert props.get("header.d") == "monitor.test"
    assert one(header, "dmarc")[0] == "fail"


def test_dkim_rsa_sha1_signature_fails(mailsuite: Mailsuite,
                                       dkim_key: tuple[bytes, str]) -> None:
    signed = sign_monitor(monitor_message(), dkim_key[0], signature_algorithm=b"rsa-sha1")
    assert b"a=rsa-sha1" in signed
    assert dkimpy_accepts(signed, dkim_key[1])
    header = our_results(deliver(mailsuite, signed, "news@monitor.test"), signed)
    assert one(header, "dkim")[0] == "fail", str(header)
    assert one(header, "dmarc")[0] == "fail"


def test_dkim_l_tag_covering_the_whole_body_passes(
        mailsuite: Mailsuite, dkim_key: tuple[bytes, str]) -> None:
    signed = sign_monitor(monitor_message(), dkim_key[0], length=True)
    assert re.search(rb"\bl=\d+", signed)
    header = our_results(deliver(mailsuite, signed, "news@monitor.test"), signed)
    assert one(header, "dkim")[0] == "pass", str(header)
    assert one(header, "dmarc")[0] == "pass"


def test_dkim_l_tag_with_content_appended_after_it_is_policy_and_earns_no_alignment(
        mailsuite: Mailsuite, dkim_key: tuple[bytes, str]) -> None:
    signed = sign_monitor(monitor_message(), dkim_key[0], length=True)
    extended = signed + b"Click here to confirm your password: http://evil.test/\r\n"
    assert dkimpy_accepts(extended, dkim_key[1])  # the signed part is intact
    header = our_results(deliver(mailsuite, extended, "news@monitor.test"), extended)
    result, props = one(header, "dkim")
    assert result == "policy", str(header)
    assert props.get("header.d") == "monitor.test"
    assert one(header, "dmarc")[0] == "fail"


# --- ARC (RFC 8617) --------------------------------------------------------------------------
def test_arc_is_none_without_an_arc_seal(mailsuite: Mailsuite) -> None:
    header = check(mailsuite, "sender@spf-pass.test", "sender@spf-pass.test")
    assert one(header, "arc") == ("none", {})


# --- DMARC (RFC 7489) ------------------------------------------------------------------------
def test_dmarc_passes_through_spf_alignment(mailsuite: Mailsuite) -> None:
    header = check(mailsuite, "sender@spf-pass.test", "boss@spf-pass.test")
    assert one(header, "spf")[0] == "pass"
    result, props = one(header, "dmarc")
    assert result == "pass", str(header)
    assert props.get("header.from") == "spf-pass.test"


def test_dmarc_passes_through_dkim_alignment_although_spf_fails(
        mailsuite: Mailsuite, dkim_key: tuple[bytes, str]) -> None:
    signed = dkim_signed(dkim_key[0])
    header = our_results(deliver(mailsuite, signed, "news@dkim.test"), signed)
    assert one(header, "spf")[0] == "fail"
    assert one(header, "dkim")[0] == "pass"
    result, props = one(header, "dmarc")
    assert result == "pass", str(header)
    assert props.get("header.from") == "dkim.test"


def test_dmarc_fails_and_names_header_from_and_the_published_policy(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    # Without enforcement: p=reject would refuse it (tests/smtp/test_dmarc_policy.py).
    server = start_mailsuite({"mx": {"dmarc_enforce": False}})
    header = check(server, "sender@spf-fail.test", "boss@spf-fail.test")
    assert one(header, "spf")[0] == "fail"
    assert one(header, "dmarc") == ("fail", {"header.from": "spf-fail.test",
                                             "policy.dmarc": "reject"})


def test_dmarc_is_none_for_a_domain_without_a_dmarc_record(mailsuite: Mailsuite) -> None:
    header = check(mailsuite, "sender@nodmarc.test", "boss@nodmarc.test")
    assert one(header, "spf")[0] == "pass"
    result, props = one(header, "dmarc")
    assert result == "none", str(header)
    assert props.get("header.from") == "nodmarc.test"


def test_dmarc_relaxed_alignment_accepts_a_mail_from_subdomain(mailsuite: Mailsuite) -> None:
    header = check(mailsuite, "bounce@bounces.spf-pass.test", "boss@spf-pass.test")
    assert one(header, "spf") == ("pass", {"smtp.mailfrom": "bounce@bounces.spf-pass.test"})
    result, props = one(header, "dmarc")
    assert result == "pass", str(header)
    assert props.get("header.from") == "spf-pass.test"


def test_dmarc_servfail_on_the_from_domain_is_temperror(mailsuite: Mailsuite) -> None:
    header = check(mailsuite, "sender@spf-pass.test", "boss@servfail.test")
    assert one(header, "spf")[0] == "pass"
    result, props = one(header, "dmarc")
    assert result == "temperror", str(header)
    assert props.get("header.from") == "servfail.test"


# --- incoming Authentication-Results (RFC 8601 5) --------------------------------------------
FOREIGN = b"Authentication-Results: other.example; dkim=pass\r\n"
FORGED = {
    "plain": b"Authentication-Results: mx.mailsuite.test; spf=pass smtp.mailfrom=ceo@bank.test\r\n",
    "case": b"Authentication-Results: MX.Mailsuite.TEST; dkim=pass header.d=bank.test\r\n",
    "comment": b"Authentication-Results: (trusted) mx.mailsuite.test; dmarc=pass\r\n",
    "version": b"Authentication-Results: mx.mailsuite.test 1; spf=pass smtp.mailfrom=c@b.test\r\n",
    "folded": b"Authentication-Results:\r\n\tmx.mailsuite.test;\r\n\tspf=pass\r\n",
    "name-case": b"authentication-results: mx.mailsuite.test; dkim=pass header.d=bank.test\r\n",
    "nested-comment": b"Authentication-Results: (checked (twice)) mx.mailsuite.test; dkim=pass\r\n",
    "escaped-paren": b"Authentication-Results: (a \\) b) mx.mailsuite.test; dkim=pass\r\n",
    "semicolon-in-comment": b"Authentication-Results: (x; y) mx.mailsuite.test; dkim=pass\r\n",
}


def forged_message(forged: bytes) -> tuple[bytes, bytes]:
    """(the message as sent, the same message with the forged field left out)."""
    sent = make_message("boss@spf-pass.test", extra=forged + FOREIGN)
    return sent, without_field(sent, forged)


def without_field(message: bytes, field: bytes) -> bytes:
    assert message.count(field) == 1
    return message.replace(field, b"", 1)


@pytest.mark.parametrize("forged", FORGED.values(), ids=FORGED.keys())
def test_incoming_authentication_results_claiming_our_hostname_is_removed(
        mailsuite: Mailsuite, forged: bytes) -> None:
    assert is_ours(forged)  # downstream readers would take it for ours
    sent, expected = forged_message(forged)
    stored = deliver(mailsuite, sent, "sender@spf-pass.test")
    header = our_results(stored, expected)  # also: exactly one field naming us remains
    assert one(header, "spf") == ("pass", {"smtp.mailfrom": "sender@spf-pass.test"})
    assert FOREIGN in stored


def test_incoming_authentication_results_of_another_authserv_id_is_kept_byte_exact(
        mailsuite: Mailsuite) -> None:
    folded = b"Authentication-Results: relay.example;\r\n  spf=fail (sender 192.0.2.9)\r\n"
    sent = make_message("boss@spf-pass.test", extra=FOREIGN + folded)
    stored = deliver(mailsuite, sent, "sender@spf-pass.test")
    our_results(stored, sent)
    assert FOREIGN + folded in stored


def test_without_auth_checks_nothing_is_added_but_forged_results_are_still_removed(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"mx": {"auth_checks": False}})
    for forged in (FORGED["plain"], FORGED["case"], FORGED["comment"]):
        sent, expected = forged_message(forged)
        stored = deliver(server, sent, "sender@spf-pass.test")
        header, rest = split_stored(stored)
        assert header is None, str(header)
        assert rest == expected
        assert FOREIGN in stored
