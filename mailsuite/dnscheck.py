"""Whether a domain's published DNS records are the ones we ask for (MX, SPF, DKIM, DMARC).

Blocking (dnspython): call it in a thread. A timeout or SERVFAIL is "temperror" for that
record, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.exception
import dns.resolver

from mailsuite.resolver import TemporaryDNSError, txt_records


@dataclass(frozen=True)
class RecordCheck:
    type: str
    name: str
    value: str
    status: str  # verified, missing, mismatch or temperror
    found: tuple[str, ...] = ()


#: the records that must match for a domain to count as verified (DMARC is advice)
REQUIRED = ("mx", "spf", "dkim")


def check_records(resolver: dns.resolver.Resolver,
                  records: list[tuple[str, str, str]]) -> list[tuple[str, RecordCheck]]:
    """(kind, check) for each (owner, type, value) that dkim.dns_records gives."""
    fresh = _uncached(resolver)
    return [(_kind(owner, rtype, value), _check(fresh, owner, rtype, value))
            for owner, rtype, value in records]


def _uncached(resolver: dns.resolver.Resolver) -> dns.resolver.Resolver:
    """The same servers and timeouts without the process's cache: an operator who has just
    published a record wants it looked up now, not remembered as missing."""
    fresh = dns.resolver.Resolver(configure=False)
    fresh.nameservers = list(resolver.nameservers)
    fresh.port = resolver.port
    fresh.timeout = resolver.timeout
    fresh.lifetime = resolver.lifetime
    return fresh


def verified(checks: list[tuple[str, RecordCheck]]) -> bool | None:
    """True when every required record matches; None when a lookup failed for now."""
    required = [check for kind, check in checks if kind in REQUIRED]
    if any(check.status == "temperror" for check in required):
        return None
    return all(check.status == "verified" for check in required)


def _kind(owner: str, rtype: str, value: str) -> str:
    if rtype == "MX":
        return "mx"
    if value.startswith("v=spf1"):
        return "spf"
    if value.startswith("v=DMARC1"):
        return "dmarc"
    return "dkim" if "._domainkey." in owner else "other"


def _check(resolver: dns.resolver.Resolver, owner: str, rtype: str,
           value: str) -> RecordCheck:
    try:
        if rtype == "MX":
            found = _mx_records(resolver, owner)
            wanted = value.split()[-1].lower()
            matches = any(record.split()[-1] == wanted for record in found)
        else:
            texts = [t.decode("utf-8", "replace") for t in txt_records(resolver, owner)]
            found, matches = _compare_txt(texts, value)
    except TemporaryDNSError:
        return RecordCheck(rtype, owner, value, "temperror")
    status = "verified" if matches else "mismatch" if found else "missing"
    return RecordCheck(rtype, owner, value, status, tuple(found))


def _mx_records(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    try:
        answer = resolver.resolve(name, "MX", raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN:
        return []
    except dns.exception.DNSException as exc:
        raise TemporaryDNSError(f"{name}: {exc.__class__.__name__}") from exc
    if answer.rrset is None:
        return []
    return sorted(f"{rdata.preference} {rdata.exchange.to_text().lower()}"
                  for rdata in answer.rrset)


def _compare_txt(texts: list[str], wanted: str) -> tuple[list[str], bool]:
    """The published records of the same kind as `wanted`, and whether one is it.

    SPF and DMARC match by their text, white space aside; DKIM by its public key (p=), since
    tag order and optional tags vary between how people publish the same key.
    """
    kind = wanted.split(";")[0].split()[0]
    if kind.startswith("v=DKIM1"):
        same_kind = [t for t in texts if "p=" in t]
        key = _tag(wanted, "p")
        return same_kind, any(_tag(t, "p") == key for t in same_kind)
    same_kind = [t for t in texts if t.split(";")[0].split()[:1] == [kind]]
    if kind == "v=DMARC1":  # any policy of the owner's choosing will do
        return same_kind, bool(same_kind)
    return same_kind, any(" ".join(t.split()) == " ".join(wanted.split()) for t in same_kind)


def _tag(record: str, name: str) -> str | None:
    for part in record.split(";"):
        key, _, val = part.strip().partition("=")
        if key.strip() == name:
            return "".join(val.split())
    return None
