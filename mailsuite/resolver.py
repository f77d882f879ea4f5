"""One dnspython resolver for the process, pointed at [dns] resolver when configured (shared
by the MX checks, delivery routing and the API's domain verification).

It is also installed as dnspython's default resolver, because pyspf looks names up through
the module-level `dns.resolver` functions and offers no other hook.
"""

from __future__ import annotations

import dns.exception
import dns.resolver

from mailsuite.config import Config


class TemporaryDNSError(Exception):
    """A timeout or SERVFAIL: the answer is unknown, not negative."""


def make_resolver(config: Config) -> dns.resolver.Resolver:
    if config.dns.resolver:
        resolver = dns.resolver.Resolver(configure=False)
        host, port = _split_host_port(config.dns.resolver)
        resolver.nameservers = [host]
        resolver.port = port
    else:
        resolver = dns.resolver.Resolver()
    resolver.timeout = config.dns.timeout
    resolver.lifetime = config.dns.timeout
    resolver.cache = dns.resolver.LRUCache(50000)  # positive and negative answers, by TTL
    return resolver


def install_resolver(resolver: dns.resolver.Resolver) -> None:
    dns.resolver.default_resolver = resolver


def _split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    host, sep, port = text.rpartition(":")
    return (host, int(port)) if sep else (text, 53)


def txt_records(resolver: dns.resolver.Resolver, name: str) -> list[bytes]:
    """Every TXT record at `name`, each joined from its strings; [] for NXDOMAIN or NODATA."""
    try:
        answer = resolver.resolve(name, "TXT", raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN:
        return []
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        raise TemporaryDNSError(f"{name}: {exc.__class__.__name__}") from exc
    except dns.exception.DNSException as exc:
        raise TemporaryDNSError(f"{name}: {exc}") from exc
    if answer.rrset is None:
        return []
    return [b"".join(rdata.strings) for rdata in answer.rrset]
