"""Outbound routing (RFC 5321 5.1, RFC 7505) against the loopback DNS server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dns.resolver
import pytest

from mailsuite.config import load_config
from mailsuite.resolver import make_resolver
from mailsuite.smtp.routing import MXHost, RouteError, resolve_route
from tests.dnsserver import start_dns_server


def _mx(*specs: str) -> list[dict[str, str]]:
    return [{"type": "MX", "value": spec} for spec in specs]


def _a(*addresses: str) -> list[dict[str, str]]:
    return [{"type": "AAAA" if ":" in a else "A", "value": a} for a in addresses]


ZONES: dict[str, Any] = {
    "records": {
        "pref.test": _mx("20 mx2.pref.test", "10 mx1.pref.test"),
        "mx1.pref.test": _a("127.0.0.11"),
        "mx2.pref.test": _a("127.0.0.12"),
        "equal.test": _mx("10 a.equal.test", "10 b.equal.test", "20 c.equal.test"),
        "a.equal.test": _a("127.0.1.1"),
        "b.equal.test": _a("127.0.1.2"),
        "c.equal.test": _a("127.0.1.3"),
        "dual.test": _mx("10 MX.Dual.Test."),
        "mx.dual.test": _a("127.0.2.1", "2001:db8::1", "127.0.2.2", "2001:db8::2"),
        "implicit.test": _a("127.0.3.1", "2001:db8::3"),
        "noaddr.test": [{"type": "TXT", "value": "v=spf1 -all"}],
        "null.test": _mx("0 ."),
        "nullmixed.test": _mx("0 .", "10 mx.nullmixed.test"),
        "mx.nullmixed.test": _a("127.0.4.1"),
        "servfail-mx.test": _mx("10 mx.servfail-mx.test"),
        "skip.test": _mx("10 gone.skip.test", "20 txt.skip.test", "30 mx.skip.test"),
        "txt.skip.test": [{"type": "TXT", "value": "no address here"}],
        "mx.skip.test": _a("127.0.5.1"),
        "stuck.test": _mx("10 gone.stuck.test", "20 mx.broken.test"),
        "loop.test": _mx("10 mail.own.test", "20 backup.loop.test"),
        "backup.loop.test": _a("127.0.6.2"),
        "backup.test": _mx(
            "10 primary.backup.test",
            "20 Mail.Own.Test",
            "20 peer.backup.test",
            "30 far.backup.test",
        ),
        "primary.backup.test": _a("127.0.7.1"),
        "peer.backup.test": _a("127.0.7.2"),
        "far.backup.test": _a("127.0.7.3"),
        "mail.own.test": _a("127.0.0.1"),
        "own.test": _a("127.0.0.1"),
        # IDNA 2008 A-labels of "bücher.test" and "faß.test".
        "xn--bcher-kva.test": _mx("10 mx.xn--bcher-kva.test"),
        "mx.xn--bcher-kva.test": _a("127.0.8.1"),
        "xn--fa-hia.test": _a("127.0.8.2"),
        "fass.test": _a("127.0.8.3"),
    },
    "servfail": ["servfail.test", "mx.servfail-mx.test", "broken.test"],
    "timeout": ["timeout.test"],
}


@pytest.fixture(scope="module")
def resolver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dns.resolver.Resolver]:
    handle = start_dns_server(ZONES, tmp_path_factory.mktemp("dns"))
    try:
        config = load_config(
            None, environ={"MAILSUITE_DNS_RESOLVER": handle.address, "MAILSUITE_DNS_TIMEOUT": "1"}
        )
        yield make_resolver(config)
    finally:
        handle.stop()


def _names(hosts: list[MXHost]) -> list[str]:
    return [host.name for host in hosts]


def _error(resolver: dns.resolver.Resolver, domain: str, own: tuple[str, ...] = ()) -> RouteError:
    with pytest.raises(RouteError) as info:
        resolve_route(resolver, domain, own)
    return info.value


# --- MX lists --------------------------------------------------------------------------------
def test_hosts_come_in_preference_order(resolver: dns.resolver.Resolver) -> None:
    assert resolve_route(resolver, "pref.test") == [
        MXHost("mx1.pref.test", 10, ("127.0.0.11",)),
        MXHost("mx2.pref.test", 20, ("127.0.0.12",)),
    ]


def test_equal_preferences_are_shuffled_and_all_kept(resolver: dns.resolver.Resolver) -> None:
    firsts = set()
    for _ in range(40):
        names = _names(resolve_route(resolver, "equal.test"))
        assert sorted(names[:2]) == ["a.equal.test", "b.equal.test"]
        assert names[2] == "c.equal.test"
        firsts.add(names[0])
    assert firsts == {"a.equal.test", "b.equal.test"}


def test_host_has_a_then_aaaa_addresses(resolver: dns.resolver.Resolver) -> None:
    [host] = resolve_route(resolver, "dual.test")
    assert host.name == "mx.dual.test"
    assert host.addresses == ("127.0.2.1", "127.0.2.2", "2001:db8::1", "2001:db8::2")


def test_domain_name_is_case_insensitive_with_optional_final_dot(
    resolver: dns.resolver.Resolver,
) -> None:
    assert _names(resolve_route(resolver, "PREF.Test.")) == ["mx1.pref.test", "mx2.pref.test"]


def test_mx_host_without_addresses_is_skipped(resolver: dns.resolver.Resolver) -> None:
    # gone.skip.test does not exist, txt.skip.test has no A or AAAA.
    assert resolve_route(resolver, "skip.test") == [MXHost("mx.skip.test", 30, ("127.0.5.1",))]


def test_only_mx_host_failing_is_temporary(resolver: dns.resolver.Resolver) -> None:
    # SERVFAIL for the host's addresses: the domain itself answered, so 4.4.4, not 4.4.3.
    error = _error(resolver, "servfail-mx.test")
    assert (error.status, error.permanent) == ("4.4.4", False)
    assert "mx.servfail-mx.test" in error.text


def test_every_mx_host_unresolvable_is_temporary(resolver: dns.resolver.Resolver) -> None:
    error = _error(resolver, "stuck.test")
    assert (error.status, error.permanent) == ("4.4.4", False)
    assert "gone.stuck.test" in error.text and "mx.broken.test" in error.text


# --- no MX -----------------------------------------------------------------------------------
def test_implicit_mx_is_the_domain_itself(resolver: dns.resolver.Resolver) -> None:
    assert resolve_route(resolver, "implicit.test") == [
        MXHost("implicit.test", 0, ("127.0.3.1", "2001:db8::3"))
    ]


def test_no_mx_and_no_address_is_permanent(resolver: dns.resolver.Resolver) -> None:
    error = _error(resolver, "noaddr.test")
    assert (error.status, error.permanent) == ("5.1.2", True)
    assert "no MX or address records" in error.text


def test_nxdomain_is_permanent(resolver: dns.resolver.Resolver) -> None:
    error = _error(resolver, "nowhere.test")
    assert (error.status, error.permanent) == ("5.1.2", True)
    assert "does not exist" in error.text
    assert str(error) == "5.1.2 domain nowhere.test does not exist"


# --- null MX ---------------------------------------------------------------------------------
def test_null_mx_is_permanent(resolver: dns.resolver.Resolver) -> None:
    error = _error(resolver, "null.test")
    assert (error.status, error.permanent) == ("5.1.10", True)
    assert "null MX" in error.text


def test_null_mx_next_to_a_real_mx_is_ignored(resolver: dns.resolver.Resolver) -> None:
    assert resolve_route(resolver, "nullmixed.test") == [
        MXHost("mx.nullmixed.test", 10, ("127.0.4.1",))
    ]


# --- DNS failures ----------------------------------------------------------------------------
def test_servfail_is_temporary(resolver: dns.resolver.Resolver) -> None:
    error = _error(resolver, "servfail.test")
    assert (error.status, error.permanent) == ("4.4.3", False)


def test_timeout_is_temporary(resolver: dns.resolver.Resolver) -> None:
    started = time.monotonic()
    error = _error(resolver, "timeout.test")
    assert (error.status, error.permanent) == ("4.4.3", False)
    assert time.monotonic() - started < 5


# --- loops -----------------------------------------------------------------------------------
def test_own_name_as_best_mx_is_a_loop(resolver: dns.resolver.Resolver) -> None:
    error = _error(resolver, "loop.test", ("mail.own.test",))
    assert (error.status, error.permanent) == ("5.4.6", True)
    assert error.text == "mail for loop.test loops back to myself"


def test_own_name_as_backup_keeps_only_better_hosts(resolver: dns.resolver.Resolver) -> None:
    # The peer at the same preference as ours goes too: it may route back to us.
    assert _names(resolve_route(resolver, "backup.test", ("MAIL.own.test.",))) == [
        "primary.backup.test"
    ]


def test_without_own_names_the_backup_list_is_whole(resolver: dns.resolver.Resolver) -> None:
    hosts = resolve_route(resolver, "backup.test", ("other.own.test",))
    assert [(h.name, h.preference) for h in hosts][0] == ("primary.backup.test", 10)
    assert sorted(_names(hosts)[1:3]) == ["mail.own.test", "peer.backup.test"]
    assert _names(hosts)[3] == "far.backup.test"


def test_implicit_mx_to_own_name_is_a_loop(resolver: dns.resolver.Resolver) -> None:
    error = _error(resolver, "own.test", ("Own.Test",))
    assert (error.status, error.permanent) == ("5.4.6", True)


# --- domain names ----------------------------------------------------------------------------
def test_unicode_domain_is_looked_up_as_a_labels(resolver: dns.resolver.Resolver) -> None:
    assert resolve_route(resolver, "Bücher.test") == [
        MXHost("mx.xn--bcher-kva.test", 10, ("127.0.8.1",))
    ]


def test_idna_2008_keeps_sharp_s(resolver: dns.resolver.Resolver) -> None:
    # IDNA 2003 would map faß.test to fass.test, another domain.
    assert resolve_route(resolver, "faß.test") == [MXHost("xn--fa-hia.test", 0, ("127.0.8.2",))]


@pytest.mark.parametrize(
    "domain", ["", ".", "a..test", "exa mple.test", "[127.0.0.1]", "☃.test", "x" * 64 + ".test"]
)
def test_invalid_domain_is_permanent(resolver: dns.resolver.Resolver, domain: str) -> None:
    error = _error(resolver, domain)
    assert (error.status, error.permanent) == ("5.1.2", True)
    assert "invalid domain" in error.text
