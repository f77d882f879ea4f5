"""SPF, DKIM, ARC and DMARC verification of an inbound message, as one Authentication-Results.

Evaluation is done by libraries (pyspf, dkimpy, dmarc); this module feeds them the message
and our resolver, maps DNS trouble to temperror, and builds the RFC 8601 header with authres.
Blocking (DNS, RSA): call it in a thread.
"""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from typing import Any

import authres
import authres.arc
import authres.dmarc
import dkim
import dmarc
import dns.resolver
import spf
from publicsuffix2 import PublicSuffixList

from mailsuite.smtp.dns import TemporaryDNSError, txt_records


class _OrgDomains:
    """Organizational domains (RFC 7489 3.2) in the shape the dmarc library asks for.

    publicsuffix2 answers the bare TLD for a name under a suffix it does not list (such as
    .test), which would align every two domains under it; two labels are the floor here.
    """

    def __init__(self) -> None:
        self._psl = PublicSuffixList()

    def get_public_suffix(self, domain: str) -> str:
        domain = domain.lower().rstrip(".")
        org = self._psl.get_sld(domain, wildcard=False)
        if not org or "." not in org:
            org = ".".join(domain.split(".")[-2:])
        return org


_ORG = _OrgDomains()
_FROM_RE = re.compile(rb"^from:", re.I)


@dataclass(frozen=True)
class SPFOutcome:
    result: str
    comment: str


class _Recent:
    """Answers kept for a minute: a busy sender sends many messages from one address, and
    re-evaluating its SPF and DMARC policy each time is pure cost. Temporary errors are not
    kept. Shared by the checking threads; dict operations are atomic under the GIL."""

    ttl = 60.0
    size = 20000

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> Any:
        hit = self._entries.get(key)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, key: Any, value: Any) -> None:
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl, value)


_SPF_RESULTS = _Recent()
_DMARC_RECORDS = _Recent()


def _spf_key(ip: str, mail_from: str, helo: str) -> tuple[str, str, str]:
    return ip, mail_from.lower(), helo.lower() if not mail_from else ""


def recent_spf(ip: str, mail_from: str, helo: str) -> SPFOutcome | None:
    """The SPF answer for this envelope if it was worked out within the last minute."""
    return _SPF_RESULTS.get(_spf_key(ip, mail_from, helo))


def check_spf(ip: str, mail_from: str, helo: str, timeout: float) -> SPFOutcome:
    """RFC 7208 check_host() of the MAIL FROM identity (the HELO identity for <>)."""
    key = _spf_key(ip, mail_from, helo)
    cached = _SPF_RESULTS.get(key)
    if cached is not None:
        return cached
    try:
        # timeout bounds each lookup; querytime the whole evaluation (up to 10 lookups).
        result, explanation = spf.check2(i=ip, s=mail_from, h=helo, timeout=timeout,
                                         querytime=4 * timeout)
    except Exception as exc:  # pyspf raises on some malformed input instead of permerror
        return SPFOutcome("permerror", str(exc)[:200])
    outcome = SPFOutcome(result, explanation)
    if result != "temperror":
        _SPF_RESULTS.put(key, outcome)
    return outcome


def authentication_results(raw: bytes, authserv_id: str, resolver: dns.resolver.Resolver,
                           ip: str, helo: str, mail_from: str,
                           spf_outcome: SPFOutcome) -> str:
    """The full `Authentication-Results: ...` header line (without CRLF)."""
    dkim_results = _check_dkim(raw, resolver)
    results: list[authres.AuthenticationResult] = [
        authres.SPFAuthenticationResult(
            result=spf_outcome.result,
            smtp_mailfrom=mail_from or None,
            smtp_helo=None if mail_from else helo,
        )
    ]
    if dkim_results:
        results.extend(dkim_results)
    else:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    results.append(authres.arc.ARCAuthenticationResult(result=_check_arc(raw, resolver)))
    results.append(_check_dmarc(raw, resolver, mail_from or f"postmaster@{helo}",
                                spf_outcome.result, dkim_results))
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    return str(header)


def _dnsfunc(resolver: dns.resolver.Resolver, failures: list[str]):  # type: ignore[no-untyped-def]
    """A TXT lookup in dkimpy's shape that remembers temporary failures."""

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = txt_records(resolver, qname)
        except TemporaryDNSError as exc:
            failures.append(str(exc))
            raise dkim.DnsTimeoutError(str(exc)) from exc
        return records[0] if records else None

    return lookup


def _check_dkim(raw: bytes, resolver: dns.resolver.Resolver) -> list[authres.AuthenticationResult]:
    verifier = dkim.DKIM(raw)
    try:
        signatures = [h for h in verifier.headers if h[0].lower() == b"dkim-signature"]
    except Exception:
        return [authres.DKIMAuthenticationResult(result="permerror")]
    results = []
    for index, (_, value) in enumerate(signatures[:8]):  # bound the work one message can cause
        tags = _signature_tags(value)
        failures: list[str] = []
        try:
            ok = verifier.verify(idx=index, dnsfunc=_dnsfunc(resolver, failures))
            result = "pass" if ok else ("temperror" if failures else "fail")
        except dkim.ValidationError:
            result = "fail"  # e.g. the body hash does not match: the signature is broken
        except dkim.DKIMException:
            result = "permerror"  # malformed signature or key: it can never verify
        results.append(authres.DKIMAuthenticationResult(
            result=result, header_d=tags.get("d"), header_s=tags.get("s"),
            header_i=tags.get("i")))
    return results


def _signature_tags(value: bytes) -> dict[str, str]:
    tags = {}
    for part in re.sub(rb"\s+", b"", value).split(b";"):
        key, sep, val = part.partition(b"=")
        if sep and key in (b"d", b"s", b"i"):
            tags[key.decode("ascii", "replace")] = val.decode("utf-8", "replace")
    return tags


def _check_arc(raw: bytes, resolver: dns.resolver.Resolver) -> str:
    if b"arc-seal" not in raw[: raw.find(b"\r\n\r\n") + 2].lower():
        return "none"
    failures: list[str] = []
    try:
        cv, _, _ = dkim.arc_verify(raw, dnsfunc=_dnsfunc(resolver, failures))
    except Exception:
        return "temperror" if failures else "fail"
    if failures:
        return "temperror"
    return {dkim.CV_Pass: "pass", dkim.CV_Fail: "fail"}.get(cv, "none")


def _header_from_domain(raw: bytes) -> str | None:
    """The RFC5322.From domain, when there is exactly one From header with one address."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    unfolded = re.sub(rb"\r\n[ \t]", b" ", head).split(b"\r\n")
    values = [line.split(b":", 1)[1] for line in unfolded if _FROM_RE.match(line)]
    if len(values) != 1:
        return None
    addresses = email.utils.getaddresses([values[0].decode("utf-8", "replace")])
    if len(addresses) != 1 or "@" not in addresses[0][1]:
        return None
    return addresses[0][1].rpartition("@")[2].lower().rstrip(".")


def _dmarc_record(resolver: dns.resolver.Resolver, domain: str) -> tuple[str | None, str | None]:
    """(record, org_domain) per RFC 7489 6.6.3: the From domain's, else its org domain's."""
    cached = _DMARC_RECORDS.get(domain)
    if cached is None:
        cached = _lookup_dmarc_record(resolver, domain)  # TemporaryDNSError is not kept
        _DMARC_RECORDS.put(domain, cached)
    return cached


def _lookup_dmarc_record(resolver: dns.resolver.Resolver,
                         domain: str) -> tuple[str | None, str | None]:
    for candidate, org in ((domain, None), (_ORG.get_public_suffix(domain), "org")):
        if org and candidate == domain:
            break
        found = txt_records(resolver, f"_dmarc.{candidate}")
        records = [r.decode("utf-8", "replace") for r in found]
        records = [r for r in records if r.lower().startswith("v=dmarc1")]
        if len(records) == 1:
            return records[0], candidate if org else None
    return None, None


def _check_dmarc(raw: bytes, resolver: dns.resolver.Resolver, mail_from: str, spf_result: str,
                 dkim_results: list[authres.AuthenticationResult]) -> authres.AuthenticationResult:
    domain = _header_from_domain(raw)
    if domain is None:
        return authres.dmarc.DMARCAuthenticationResult(result="permerror")
    try:
        record, org_domain = _dmarc_record(resolver, domain)
    except TemporaryDNSError:
        return authres.dmarc.DMARCAuthenticationResult(result="temperror", header_from=domain)
    if record is None:
        return authres.dmarc.DMARCAuthenticationResult(result="none", header_from=domain)
    evaluator = dmarc.DMARC(publicsuffix=_ORG)
    try:
        policy = evaluator.parse_record(record, domain=domain, org_domain=org_domain)
    except dmarc.Error:
        return authres.dmarc.DMARCAuthenticationResult(result="permerror", header_from=domain)
    spf_domain = mail_from.rpartition("@")[2].lower()
    spf_verdict = dmarc.SPF(domain=spf_domain, result=dmarc.SPFResult(spf_result))
    dkim_verdicts = [
        dmarc.DKIM(domain=r.header_d.lower(), result=dmarc.DKIMResult(r.result))
        for r in dkim_results if getattr(r, "header_d", None)
    ]
    outcome = evaluator.get_result(
        policy, auth_results=dmarc.AuthResults(spf=spf_verdict, dkim=dkim_verdicts or None))
    passed = outcome.result is dmarc.DMARCResult.PASS
    return authres.dmarc.DMARCAuthenticationResult(
        result="pass" if passed else "fail", header_from=domain,
        policy=outcome.disposition.value if not passed else policy.p.value)

