"""The authentication checks of the MX are linear in the message and total.

authentication_results() is called directly where what is measured is its own CPU time (the
SMTP side has header limits of its own); malformed header sections go through the real MX.
"""

from __future__ import annotations

import smtplib
import time

import dkim
import dns.resolver
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsuite import dkim as mailsuite_dkim
from mailsuite import dkimlinear
from mailsuite.config import Config, DNSConfig
from mailsuite.resolver import make_resolver
from mailsuite.smtp import authresults
from tests.dnsserver import DNSServerHandle
from tests.harness import TEST_HOSTNAME, Mailsuite
from tests.smtp.test_mx_auth_results import make_message, one, our_results, parse_ar

SPF_NONE = authresults.SPFOutcome("none", "not checked")


@pytest.fixture(scope="module")
def resolver(dns_server: DNSServerHandle) -> dns.resolver.Resolver:
    return make_resolver(Config(dns=DNSConfig(resolver=dns_server.address, timeout=1.0)))


def check(raw: bytes, resolver: dns.resolver.Resolver) -> tuple[authresults.Verdict, float]:
    """The verdict on `raw` and the process CPU seconds it took."""
    start = time.process_time()
    verdict = authresults.check_message(raw, TEST_HOSTNAME, resolver, "127.0.0.1",
                                        "client.test", "news@dkim.test", SPF_NONE)
    return verdict, time.process_time() - start


def folded_field(megabytes: int) -> bytes:
    line = b"\r\n\t" + b"x" * 73
    return b"X-Long: start" + line * (megabytes * 1024 * 1024 // len(line)) + b"\r\n"


def sign(message: bytes, private_pem: bytes, headers: list[bytes],
         canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed")) -> bytes:
    """`message` with one more DKIM-Signature by the dkim.test key.

    dkimpy's own message parser is quadratic (the point of these tests), so the signer is
    handed the fields split by our parser.
    """
    parsed = dkimlinear.parse_message(message)
    signer = dkim.DKIM()
    signer.headers = [list(f) for f in parsed.fields]
    signer.body = parsed.body
    return signer.sign(b"sel", b"dkim.test", private_pem, include_headers=headers,
                       canonicalize=canonicalize) + message


# --- cost ------------------------------------------------------------------------------------
@pytest.mark.parametrize("megabytes", [8, 20])
def test_a_long_folded_header_costs_linear_cpu_without_a_signature(
        resolver: dns.resolver.Resolver, megabytes: int) -> None:
    # dkimpy's own parser took 32 s of CPU for 8 MB here (quadratic: minutes for 20 MB).
    raw = make_message("news@dkim.test", extra=folded_field(megabytes))
    verdict, seconds = check(raw, resolver)
    assert seconds < 3.0, f"{megabytes} MB folded header: {seconds:.2f} s CPU"
    assert [d.result for d in verdict.dkim] == []
    assert verdict.dmarc.result == "fail"  # From is found past the long field


@pytest.mark.parametrize("megabytes", [8, 20])
def test_a_long_folded_signed_header_costs_linear_cpu_and_still_verifies(
        resolver: dns.resolver.Resolver, dkim_key: tuple[bytes, str], megabytes: int) -> None:
    unsigned = make_message("news@dkim.test", extra=folded_field(megabytes))
    raw = sign(unsigned, dkim_key[0], [b"from", b"subject", b"x-long"])
    verdict, seconds = check(raw, resolver)
    assert seconds < 6.0, f"{megabytes} MB folded signed header: {seconds:.2f} s CPU"
    assert [d.result for d in verdict.dkim] == ["pass"]
    assert verdict.dmarc.result == "pass"


def test_a_body_line_of_spaces_with_a_relaxed_signature_costs_linear_cpu(
        resolver: dns.resolver.Resolver, dkim_key: tuple[bytes, str]) -> None:
    # dkimpy's relaxed body canonicalization is quadratic in a whitespace run that is not
    # followed by CRLF: 30 KB of spaces took 9 s, 1 MB more than ten minutes.
    unsigned = make_message("news@dkim.test", body=b" " * 1_000_000 + b"x\r\n")
    raw = sign(unsigned, dkim_key[0], [b"from", b"subject"])
    verdict, seconds = check(raw, resolver)
    assert seconds < 2.0, f"1 MB of spaces: {seconds:.2f} s CPU"
    assert [d.result for d in verdict.dkim] == ["pass"]


def test_many_signatures_canonicalize_the_body_once(
        resolver: dns.resolver.Resolver, dkim_key: tuple[bytes, str]) -> None:
    unsigned = make_message("news@dkim.test", body=b"Some text  here\t \r\n" * 500_000)
    raw = unsigned
    for _ in range(authresults.MAX_SIGNATURES + 4):
        raw = sign(raw, dkim_key[0], [b"from", b"subject"])
    start = time.process_time()
    dkimlinear.parse_message(raw)
    dkim.canonicalization.Relaxed.canonicalize_body(dkimlinear.parse_message(raw).body)
    one_pass = time.process_time() - start
    verdict, seconds = check(raw, resolver)
    assert [d.result for d in verdict.dkim] == ["pass"] * authresults.MAX_SIGNATURES
    # Eight signatures checked, each hashing the body: far less than eight canonicalizations.
    assert seconds < 4 * one_pass + 1.0, (seconds, one_pass)


# --- totality --------------------------------------------------------------------------------
MALFORMED = {
    "no-colon": b"This line has no colon\r\n",
    "nul-in-name": b"X-Bad\x00Name: value\r\n",
    "space-in-name": b"X Bad: value\r\n",
    "8bit-name": "X-Ünïcode: value\r\n".encode(),
    "empty-name": b": value\r\n",
    "bare-cr-name": b"X-\rBad: value\r\n",
}


@pytest.mark.parametrize("line", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_header_line_is_a_defect_and_makes_signatures_permerror(
        resolver: dns.resolver.Resolver, dkim_key: tuple[bytes, str], line: bytes) -> None:
    signed = sign(make_message("news@dkim.test"), dkim_key[0], [b"from", b"subject"])
    head, _, body = signed.partition(b"\r\n\r\n")
    verdict, _ = check(head + b"\r\n" + line + b"\r\n" + body, resolver)
    assert verdict.defects
    assert [d.result for d in verdict.dkim] == ["permerror"]
    assert verdict.dmarc.from_domain == "dkim.test"
    assert parse_ar(verdict.header.encode() + b"\r\n") is not None


def test_a_header_section_that_starts_with_whitespace_is_a_defect(
        resolver: dns.resolver.Resolver) -> None:
    verdict, _ = check(b" folded first\r\n" + make_message("news@dkim.test"), resolver)
    assert verdict.defects == ("the header section starts with a continuation line",)
    assert verdict.dmarc.from_domain == "dkim.test"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=60), max_size=12), body=st.binary(max_size=200),
       signature=st.binary(max_size=200))
def test_any_header_section_gets_a_verdict_and_a_well_formed_header(
        resolver: dns.resolver.Resolver, lines: list[bytes], body: bytes,
        signature: bytes) -> None:
    raw = (b"DKIM-Signature: " + signature + b"\r\nARC-Seal: " + signature + b"\r\n"
           + b"\r\n".join(lines) + b"\r\n\r\n" + body)
    verdict, _ = check(raw, resolver)
    parsed = parse_ar(verdict.header.encode("utf-8") + b"\r\n")
    assert parsed is not None and parsed.authserv_id == TEST_HOSTNAME, verdict.header
    assert "\r" not in verdict.header and "\n" not in verdict.header


@pytest.mark.parametrize("line", [*MALFORMED.values(), b" leading-fold\r\n"],
                         ids=[*MALFORMED.keys(), "leading-fold"])
def test_the_mx_never_defers_a_malformed_header_section(mailsuite: Mailsuite,
                                                       line: bytes) -> None:
    """Refused for good (5xx, nothing stored) or accepted with a verdict; never a 4xx that
    the sender would retry for days."""
    message = make_message("news@spf-pass.test")
    sent = line + message if line.startswith(b" ") else message.replace(b"To:", line + b"To:")
    recipient = mailsuite.new_account()
    with smtplib.SMTP(*mailsuite.mx, local_hostname="client.test", timeout=30) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.mail("news@spf-pass.test")[0] == 250
        assert smtp.rcpt(recipient)[0] == 250
        code, text = smtp.data(sent)
    stored = mailsuite.inbox(recipient)
    if code == 250:
        assert len(stored) == 1
        header = our_results(stored[0])
        assert one(header, "spf")[0] == "pass"
    else:
        assert 500 <= code < 600, (code, text)
        assert stored == []
    assert "Traceback" not in mailsuite.log()


# --- signing (submission) --------------------------------------------------------------------
def test_signing_a_long_folded_header_costs_linear_cpu() -> None:
    """Submission signs what users send: the same quadratic parser was there."""
    key = mailsuite_dkim.generate_key("monitor.test", bits=1024)
    unsigned = make_message("news@monitor.test", extra=folded_field(8))
    start = time.process_time()
    signed = mailsuite_dkim.sign_message(unsigned, [key])
    seconds = time.process_time() - start
    assert seconds < 3.0, f"8 MB folded header signed in {seconds:.2f} s CPU"
    assert signed.endswith(unsigned) and signed.startswith(b"DKIM-Signature:")


def test_signing_refuses_a_malformed_header_section() -> None:
    key = mailsuite_dkim.generate_key("monitor.test", bits=1024)
    with pytest.raises(dkim.DKIMException):
        mailsuite_dkim.sign_message(b" leading fold\r\n" + make_message("a@monitor.test"), [key])
