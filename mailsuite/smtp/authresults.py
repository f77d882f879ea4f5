"""SPF, DKIM, ARC and DMARC verification of an inbound message, as one Authentication-Results.

Evaluation is done by libraries (pyspf, dkimpy, dmarc); this module feeds them the message
and our resolver, maps DNS trouble to temperror, and builds the RFC 8601 header with authres.
Blocking (DNS, RSA): call it in a thread.

Every check is total and linear in the size of the message. The header section is split
here, in one pass; dkimpy never parses the message itself (its parser is quadratic on long
folded fields and raises on malformed lines) and is handed only the fields a signature names,
each signature field size-capped. Nothing that a message contains makes these functions raise:
a malformed header section makes its signatures permerror, never an exception.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import authres
import authres.arc
import authres.dmarc
import dkim
import dkim.util
import dmarc
import dns.resolver
import spf
from publicsuffix2 import PublicSuffixList

from mailsuite import dkimlinear
from mailsuite.dkimlinear import ParsedMessage, parse_message
from mailsuite.resolver import TemporaryDNSError, txt_records

#: DKIM signatures checked per message; the rest are ignored (each costs DNS and RSA).
MAX_SIGNATURES = 8
#: A DKIM-Signature or ARC field larger than this is refused unparsed: real ones are under
#: 3 KB (an 8192-bit b= is 1.4 KB), and dkimpy's tag regexes are not linear in them.
MAX_SIGNATURE_FIELD = 8192
#: Names a signature's h= may list; real signers list under 50, oversigning included.
MAX_SIGNED_FIELDS = 128
#: ARC sets (RFC 8617 5.1.1 fails chains longer than 50).
MAX_ARC_SETS = 50
#: A From field larger than this is not parsed for DMARC (a single address needs far less).
MAX_FROM_FIELD = 16384

_ARC_FIELDS = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
# A whitespace run this long has no place in a signature field and would make dkimpy's
# tag regexes (such as the h= split) quadratic in it.
_LONG_WHITESPACE = re.compile(rb"\s{256}")
# What a reported property (header.d and the like) may hold: it goes into our own header.
_SAFE_PROPERTY = re.compile(r"[A-Za-z0-9._@+=-]{1,255}\Z")


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


def organizational_domain(domain: str) -> str:
    return _ORG.get_public_suffix(domain)


@dataclass(frozen=True)
class SPFOutcome:
    result: str
    comment: str


@dataclass(frozen=True)
class DKIMOutcome:
    result: str  # RFC 8601: pass, fail, policy, neutral, temperror, permerror
    domain: str | None = None
    selector: str | None = None
    identity: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ARCOutcome:
    result: str  # none, pass, fail, temperror
    sealer: str | None = None  # d= of the newest ARC-Seal of a chain that passes


@dataclass(frozen=True)
class DMARCOutcome:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str | None = None
    #: the policy the From domain asks for on failure (p=, or sp= found at the org domain)
    policy: str | None = None
    pct: int = 100
    reason: str | None = None
    #: several From fields or addresses: no single author domain to evaluate
    ambiguous: bool = False


@dataclass(frozen=True)
class Verdict:
    """Every result for one message, and the header that records them."""

    header: str  # the full `Authentication-Results: ...` line, without CRLF
    spf: SPFOutcome
    dkim: tuple[DKIMOutcome, ...]
    arc: ARCOutcome
    dmarc: DMARCOutcome
    defects: tuple[str, ...]

    @property
    def temperror(self) -> bool:
        """SPF or a DKIM signature could not be evaluated for a temporary DNS failure."""
        return self.spf.result == "temperror" or any(d.result == "temperror"
                                                     for d in self.dkim)


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


def check_message(raw: bytes, authserv_id: str, resolver: dns.resolver.Resolver,
                  ip: str, helo: str, mail_from: str, spf_outcome: SPFOutcome) -> Verdict:
    """DKIM, ARC and DMARC of `raw` (SPF was checked on the envelope) and their header."""
    message = parse_message(raw)
    with dkimlinear.once_per_body():
        dkim_outcomes = _check_dkim(message, resolver)
        arc = _check_arc(message, resolver)
    dmarc_outcome = _check_dmarc(message, resolver, mail_from or f"postmaster@{helo}",
                                 spf_outcome.result, dkim_outcomes)
    results: list[authres.AuthenticationResult] = [
        authres.SPFAuthenticationResult(
            result=spf_outcome.result,
            smtp_mailfrom=mail_from or None,
            smtp_helo=None if mail_from else helo,
        )
    ]
    results.extend(authres.DKIMAuthenticationResult(
        result=d.result, reason=d.reason, header_d=d.domain, header_s=d.selector,
        header_i=d.identity) for d in dkim_outcomes)
    if not dkim_outcomes:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    results.append(authres.arc.ARCAuthenticationResult(result=arc.result))
    results.append(authres.dmarc.DMARCAuthenticationResult(
        result=dmarc_outcome.result, reason=dmarc_outcome.reason,
        header_from=dmarc_outcome.from_domain, policy=dmarc_outcome.policy))
    header = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
    return Verdict(header, spf_outcome, tuple(dkim_outcomes), arc, dmarc_outcome,
                   tuple(message.defects))


def authentication_results(raw: bytes, authserv_id: str, resolver: dns.resolver.Resolver,
                           ip: str, helo: str, mail_from: str,
                           spf_outcome: SPFOutcome) -> str:
    """The full `Authentication-Results: ...` header line (without CRLF)."""
    return check_message(raw, authserv_id, resolver, ip, helo, mail_from, spf_outcome).header


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


def _signature_tags(value: bytes) -> dict[bytes, bytes] | None:
    """The tag list of a DKIM-Signature or ARC field, None when it is unusable."""
    if len(value) > MAX_SIGNATURE_FIELD or _LONG_WHITESPACE.search(value):
        return None
    try:
        return dkim.util.parse_tag_value(value)
    except Exception:  # dkimpy's tag parser raises several types on malformed input
        return None


def _signed_names(tags: dict[bytes, bytes]) -> list[bytes] | None:
    names = [name.strip().lower() for name in tags.get(b"h", b"").split(b":")]
    if not names or len(names) > MAX_SIGNED_FIELDS or not all(names):
        return None
    return names


def _property(value: bytes | None) -> str | None:
    """A tag value fit to be quoted in our header, else None (it is then left out)."""
    if value is None:
        return None
    text = re.sub(r"\s+", "", value.decode("utf-8", "replace"))
    return text if _SAFE_PROPERTY.match(text) else None


def _subset(message: ParsedMessage, wanted: Counter[bytes], keep: set[int]) -> list[Any]:
    """The fields a verifier needs, in message order: those at the indexes in `keep`, and
    the last n+1 of each name listed n times in `wanted`. One more than listed, because
    dkimpy also hashes an extra From to catch a From added after signing; any further
    instance could not be selected by h= (RFC 6376 5.4.2 picks them from the bottom up).
    Bounding what dkimpy sees keeps its per-name scans (select_headers) small."""
    remaining = {name: count + 1 for name, count in wanted.items()}
    chosen = set(keep)
    for index in range(len(message.names) - 1, -1, -1):
        left = remaining.get(message.names[index], 0)
        if left:
            remaining[message.names[index]] = left - 1
            chosen.add(index)
    return sorted(chosen)


def _check_dkim(message: ParsedMessage, resolver: dns.resolver.Resolver) -> list[DKIMOutcome]:
    indexes = [i for i, name in enumerate(message.names) if name == b"dkim-signature"]
    bodies: dict[bytes, int] = {}  # canonical body length by c= value
    return [_check_signature(message, index, resolver, bodies)
            for index in indexes[:MAX_SIGNATURES]]


def _check_signature(message: ParsedMessage, index: int, resolver: dns.resolver.Resolver,
                     bodies: dict[bytes, int]) -> DKIMOutcome:
    tags = _signature_tags(message.fields[index][1])
    if tags is None:
        return DKIMOutcome("permerror", reason="unparsable signature")
    found = {"domain": _property(tags.get(b"d")), "selector": _property(tags.get(b"s")),
             "identity": _property(tags.get(b"i"))}
    if message.defects:
        return DKIMOutcome("permerror", reason="malformed header section", **found)
    names = _signed_names(tags)
    if names is None:
        return DKIMOutcome("permerror", reason="unusable h= tag", **found)
    if b"from" not in names:
        # RFC 6376 5.4: a signature that does not cover From must be ignored.
        return DKIMOutcome("permerror", reason="From is not signed", **found)
    if tags.get(b"a", b"").strip().lower() == b"rsa-sha1":
        return DKIMOutcome("fail", reason="rsa-sha1 is not accepted (RFC 8301)", **found)
    chosen = _subset(message, Counter(names), {index})
    verifier = dkim.DKIM()
    verifier.headers = [list(message.fields[i]) for i in chosen]
    verifier.body = message.body
    # dkimpy picks the signature to check by its rank among the DKIM-Signature fields.
    rank = sum(1 for i in chosen if i < index and message.names[i] == b"dkim-signature")
    failures: list[str] = []
    try:
        ok = verifier.verify(idx=rank, dnsfunc=_dnsfunc(resolver, failures))
    except dkim.ValidationError:
        return DKIMOutcome("fail", **found)  # e.g. the body hash does not match
    except Exception:  # a malformed signature or key (any dkimpy error): it never verifies
        return DKIMOutcome("permerror", **found)
    if not ok:
        return DKIMOutcome("temperror" if failures else "fail", **found)
    length = tags.get(b"l", b"").strip()
    if length and (not length.isdigit() or _body_length(message.body, tags, bodies) > int(length)):
        # The signature covers only the start of the body; what follows is anyone's.
        return DKIMOutcome("policy", reason="l= does not cover the whole body", **found)
    return DKIMOutcome("pass", **found)


def _body_length(body: bytes, tags: dict[bytes, bytes], bodies: dict[bytes, int]) -> int:
    c = tags.get(b"c", b"simple/simple")
    if c not in bodies:
        policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(c)
        bodies[c] = len(policy.canonicalize_body(body))
    return bodies[c]


def _check_arc(message: ParsedMessage, resolver: dns.resolver.Resolver) -> ARCOutcome:
    indexes = [i for i, name in enumerate(message.names) if name in _ARC_FIELDS]
    seals = sum(1 for i in indexes if message.names[i] == b"arc-seal")
    if not seals:
        return ARCOutcome("none")
    if message.defects or seals > MAX_ARC_SETS or len(indexes) > 3 * MAX_ARC_SETS:
        return ARCOutcome("fail")
    wanted: Counter[bytes] = Counter()
    for i in indexes:
        if len(message.fields[i][1]) > MAX_SIGNATURE_FIELD:
            return ARCOutcome("fail")
        tags = _signature_tags(message.fields[i][1])
        if tags is None and message.names[i] != b"arc-authentication-results":
            return ARCOutcome("fail")
        if message.names[i] == b"arc-message-signature":
            names = _signed_names(tags or {})
            if names is None:
                return ARCOutcome("fail")
            wanted |= Counter(names)  # per name, the most any one signature lists
    if sum(wanted.values()) > 8 * MAX_SIGNED_FIELDS:
        return ARCOutcome("fail")
    verifier = dkim.ARC()
    verifier.headers = [list(message.fields[i]) for i in _subset(message, wanted, set(indexes))]
    verifier.body = message.body
    failures: list[str] = []
    try:
        cv, results, _ = verifier.verify(dnsfunc=_dnsfunc(resolver, failures))
    except Exception:  # dkimpy raises more than DKIMException on malformed sets
        return ARCOutcome("temperror" if failures else "fail")
    if failures:
        return ARCOutcome("temperror")
    if cv == dkim.CV_Pass:
        sealer = _property(results[0].get("as-domain")) if results else None
        return ARCOutcome("pass", sealer.lower() if sealer else None)
    return ARCOutcome("fail" if cv == dkim.CV_Fail else "none")


def _header_from_domain(message: ParsedMessage) -> tuple[str | None, str | None, bool]:
    """(the RFC5322.From domain, None, False) when there is exactly one From field with one
    address; else (None, why not, whether it names several authors)."""
    values = [message.fields[i][1] for i, name in enumerate(message.names) if name == b"from"]
    if len(values) != 1:
        return None, f"{len(values)} From fields", len(values) > 1
    if len(values[0]) > MAX_FROM_FIELD:
        return None, "From field too large", False
    text = values[0].replace(b"\r\n", b"").decode("utf-8", "replace")
    addresses = email.utils.getaddresses([text])
    if len(addresses) != 1 or "@" not in addresses[0][1]:
        return None, "From does not hold one address", len(addresses) > 1
    domain = addresses[0][1].rpartition("@")[2].lower().rstrip(".")
    if not _property(domain.encode("utf-8")):
        return None, "bad From domain", False
    return domain, None, False


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


def _check_dmarc(message: ParsedMessage, resolver: dns.resolver.Resolver, mail_from: str,
                 spf_result: str, dkim_outcomes: list[DKIMOutcome]) -> DMARCOutcome:
    domain, problem, ambiguous = _header_from_domain(message)
    if domain is None:
        return DMARCOutcome("permerror", reason=problem, ambiguous=ambiguous)
    try:
        record, org_domain = _dmarc_record(resolver, domain)
    except TemporaryDNSError:
        return DMARCOutcome("temperror", domain)
    if record is None:
        return DMARCOutcome("none", domain)
    evaluator = dmarc.DMARC(publicsuffix=_ORG)
    try:
        policy = evaluator.parse_record(record, domain=domain, org_domain=org_domain)
        spf_domain = mail_from.rpartition("@")[2].lower()
        spf_verdict = dmarc.SPF(domain=spf_domain, result=dmarc.SPFResult(spf_result))
        # Only a pass earns alignment; policy (a partial l= signature) and the rest do not.
        dkim_verdicts = [dmarc.DKIM(domain=d.domain.lower(), result=dmarc.DKIMResult.PASS)
                         for d in dkim_outcomes if d.result == "pass" and d.domain]
        outcome = evaluator.get_result(
            policy, auth_results=dmarc.AuthResults(spf=spf_verdict,
                                                   dkim=dkim_verdicts or None))
    except Exception:  # the dmarc library raises several types on malformed records
        return DMARCOutcome("permerror", domain, reason="unusable DMARC record")
    requested = (policy.sp if org_domain and policy.sp is not dmarc.DMARCDisposition.UNSPECIFIED
                 else policy.p)
    pct = min(max(policy.pct, 0), 100)
    if outcome.result is dmarc.DMARCResult.PASS:
        return DMARCOutcome("pass", domain, requested.value, pct)
    return DMARCOutcome("fail", domain, requested.value, pct)
