"""Where to deliver mail for a domain: its MX hosts and their addresses (RFC 5321 5.1).

Blocking dnspython lookups, meant to run in a thread.  Null MX (RFC 7505), the implicit MX,
loop prevention and IDN domains are handled here; failures are a RouteError carrying the
enhanced status code (RFC 3463) the delivery code reports.
"""

from __future__ import annotations

import random
import re
from collections.abc import Collection
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.resolver
import dns.rrset

# IDNA 2008 as registries apply it: the IDNA 2003 codec (str.encode("idna")) maps "faß.de" to
# "fass.de", which is a different domain.
_IDNA = dns.name.IDNA_2008_Practical
_LDH_LABEL = re.compile(rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


@dataclass(frozen=True)
class MXHost:
    """One delivery candidate: an exchange host and its addresses."""

    name: str  # A-labels, lower case, no trailing dot
    preference: int
    addresses: tuple[str, ...]  # A then AAAA, in answer order


class RouteError(Exception):
    """No route to a domain; `permanent` tells a bounce (5.x.x) from a retry (4.x.x)."""

    def __init__(self, status: str, text: str, permanent: bool) -> None:
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text
        self.permanent = permanent


def resolve_route(
    resolver: dns.resolver.Resolver, domain: str, own_names: Collection[str] = ()
) -> list[MXHost]:
    """The hosts to try for `domain`, best first; raises RouteError when there are none.

    `own_names` are our own host names: an MX pointing at one of them, and every MX not
    better than it, is dropped so that mail does not loop back to us.
    """
    name = _domain_name(domain)
    try:
        mx = _lookup(resolver, name, "MX")
    except dns.resolver.NXDOMAIN:
        raise RouteError("5.1.2", f"domain {domain} does not exist", permanent=True) from None
    if mx is None:
        # RFC 5321 5.1: no MX records means the domain itself, as if at preference 0.
        candidates = [(0, name)]
    else:
        # A "." exchange next to real ones violates RFC 7505 and is not a host: skip it.
        candidates = [(r.preference, r.exchange) for r in mx if r.exchange != dns.name.root]
        if not candidates:
            raise RouteError("5.1.10", f"{domain} accepts no mail (null MX)", permanent=True)
    candidates = _without_loops(candidates, own_names)
    if not candidates:
        raise RouteError("5.4.6", f"mail for {domain} loops back to myself", permanent=True)

    if mx is None:
        addresses = _addresses(resolver, name)
        if not addresses:
            raise RouteError(
                "5.1.2", f"domain {domain} has no MX or address records", permanent=True
            )
        return [MXHost(_text(name), 0, addresses)]

    hosts: list[MXHost] = []
    failures: list[str] = []
    for preference, exchange in _ordered(candidates):
        try:
            addresses = _addresses(resolver, exchange)
        except RouteError as exc:
            # Another MX may still be reachable; the caller only needs one.
            failures.append(exc.text)
            continue
        if addresses:
            hosts.append(MXHost(_text(exchange), preference, addresses))
        else:
            failures.append(f"{_text(exchange)} has no address records")
    if not hosts:
        raise RouteError(
            "4.4.4",
            f"no MX host of {domain} has an address: {'; '.join(failures)}",
            permanent=False,
        )
    return hosts


def _domain_name(domain: str) -> dns.name.Name:
    """`domain` (Unicode or A-labels, optional trailing dot) as an absolute DNS name."""
    try:
        name = dns.name.from_unicode(domain, idna_codec=_IDNA)
    except dns.exception.DNSException as exc:
        raise RouteError("5.1.2", f"invalid domain {domain!r}: {exc}", permanent=True) from exc
    labels = name.labels[:-1]
    if not labels or not all(_LDH_LABEL.fullmatch(label) for label in labels):
        raise RouteError("5.1.2", f"invalid domain {domain!r}", permanent=True)
    return name


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _lookup(
    resolver: dns.resolver.Resolver, name: dns.name.Name, rdtype: str
) -> dns.rrset.RRset | None:
    """The answer's RRset, None for NODATA; NXDOMAIN propagates, other failures are 4.4.3."""
    try:
        answer = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        raise
    except dns.exception.DNSException as exc:
        raise RouteError(
            "4.4.3", f"DNS lookup of {rdtype} {_text(name)} failed: {exc}", permanent=False
        ) from exc
    return answer.rrset


def _addresses(resolver: dns.resolver.Resolver, name: dns.name.Name) -> tuple[str, ...]:
    """A then AAAA addresses of `name`; a failure only counts when the other type gave none."""
    addresses: list[str] = []
    failure: RouteError | None = None
    for rdtype in ("A", "AAAA"):
        try:
            rrset = _lookup(resolver, name, rdtype)
        except dns.resolver.NXDOMAIN:
            return ()
        except RouteError as exc:
            # Some servers still mishandle AAAA queries; the A answer is then enough.
            failure = exc
            continue
        if rrset is not None:
            addresses.extend(rdata.address for rdata in rrset)
    if failure is not None and not addresses:
        raise failure
    return tuple(addresses)


def _without_loops(
    candidates: list[tuple[int, dns.name.Name]], own_names: Collection[str]
) -> list[tuple[int, dns.name.Name]]:
    """Drop our own hosts and every host not better than the best of them (RFC 5321 5.1)."""
    own = {n.rstrip(".").lower() for n in own_names}
    own_preferences = [pref for pref, host in candidates if _text(host) in own]
    if not own_preferences:
        return candidates
    cutoff = min(own_preferences)
    return [(pref, host) for pref, host in candidates if pref < cutoff]


def _ordered(
    candidates: list[tuple[int, dns.name.Name]],
) -> list[tuple[int, dns.name.Name]]:
    """By preference, each exchange once at its best one, equal preferences shuffled."""
    best: dict[dns.name.Name, int] = {}
    for pref, host in candidates:
        best[host] = min(pref, best.get(host, pref))
    groups: dict[int, list[dns.name.Name]] = {}
    for host, pref in best.items():
        groups.setdefault(pref, []).append(host)
    ordered: list[tuple[int, dns.name.Name]] = []
    for pref in sorted(groups):
        # RFC 5321 5.1: spread the load over MX hosts of equal preference.
        random.shuffle(groups[pref])
        ordered.extend((pref, host) for host in groups[pref])
    return ordered
