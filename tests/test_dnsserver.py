"""Tests for the test-only authoritative DNS server in tests/dnsserver.py."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

try:
    # Works when the repo root is importable (python -m pytest, tests/ as a package) ...
    from tests.dnsserver import DNSServerHandle, start_dns_server
except ImportError:
    # ... otherwise pytest's rootdir-less "prepend" import mode puts tests/ on sys.path.
    from dnsserver import DNSServerHandle, start_dns_server

# A 2048-bit DKIM record is ~410 bytes: more than one 255-byte string.
LONG_DKIM = "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 350 + "IDAQAB"
# A 4096-bit one (~740 bytes) no longer fits a 512-byte UDP answer.
HUGE_DKIM = "v=DKIM1; k=rsa; p=MIICIjANBgkqhkiG9w0BAQEFAAOCAg8AMIICCgKCAgEA" + "y" * 680 + "IDAQAB"

ZONES: dict[str, Any] = {
    "records": {
        "example.test": [
            {"type": "TXT", "value": "v=spf1 ip4:127.0.0.1 -all"},
            {"type": "MX", "value": "10 mx.example.test"},
            {"type": "A", "value": "127.0.0.1"},
        ],
        "Mixed.Case.Test.": [{"type": "A", "value": "127.0.0.9"}],
        "mx.example.test": [
            {"type": "A", "value": "127.0.0.2"},
            {"type": "AAAA", "value": "::1"},
        ],
        "alias.example.test": [{"type": "CNAME", "value": "mx.example.test"}],
        "1.0.0.127.in-addr.arpa": [{"type": "PTR", "value": "mx.example.test"}],
        "sel._domainkey.example.test": [{"type": "TXT", "value": LONG_DKIM}],
        "big._domainkey.example.test": [{"type": "TXT", "value": HUGE_DKIM}],
    },
    "servfail": ["servfail.test"],
    "timeout": ["timeout.test"],
}


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DNSServerHandle]:
    # One read-only server for the module; tests that change data start their own.
    handle = start_dns_server(ZONES, tmp_path_factory.mktemp("dns"))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def private_dns_server(tmp_path: Path) -> Iterator[DNSServerHandle]:
    handle = start_dns_server(ZONES, tmp_path)
    try:
        yield handle
    finally:
        handle.stop()


def make_resolver(server: DNSServerHandle, lifetime: float = 3.0) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    resolver.cache = None  # so update() results are seen immediately
    return resolver


def texts(answer: dns.resolver.Answer) -> list[str]:
    return [str(r) for r in answer]


def test_a_record_is_answered(dns_server: DNSServerHandle) -> None:
    answer = make_resolver(dns_server).resolve("example.test", "A")
    assert texts(answer) == ["127.0.0.1"]


def test_address_combines_loopback_host_and_port(dns_server: DNSServerHandle) -> None:
    assert dns_server.address == f"127.0.0.1:{dns_server.port}"
    assert dns_server.port > 0


def test_mx_record_has_preference_and_host(dns_server: DNSServerHandle) -> None:
    answer = make_resolver(dns_server).resolve("example.test", "MX")
    assert [(r.preference, r.exchange.to_text()) for r in answer] == [(10, "mx.example.test.")]


def test_aaaa_ptr_and_short_txt_records_are_answered(dns_server: DNSServerHandle) -> None:
    resolver = make_resolver(dns_server)
    assert texts(resolver.resolve("mx.example.test", "AAAA")) == ["::1"]
    assert texts(resolver.resolve("1.0.0.127.in-addr.arpa", "PTR")) == ["mx.example.test."]
    [txt] = resolver.resolve("example.test", "TXT")
    assert txt.strings == (b"v=spf1 ip4:127.0.0.1 -all",)


def test_cname_is_followed_to_the_target_address(dns_server: DNSServerHandle) -> None:
    answer = make_resolver(dns_server).resolve("alias.example.test", "A")
    assert answer.canonical_name.to_text() == "mx.example.test."
    assert texts(answer) == ["127.0.0.2"]


def test_names_are_case_insensitive_and_ignore_the_trailing_dot(
    dns_server: DNSServerHandle,
) -> None:
    resolver = make_resolver(dns_server)
    assert texts(resolver.resolve("mixed.case.test", "A")) == ["127.0.0.9"]
    assert texts(resolver.resolve("EXAMPLE.TEST.", "A")) == ["127.0.0.1"]


def test_long_txt_value_is_split_into_255_byte_strings_and_rejoins_exactly(
    dns_server: DNSServerHandle,
) -> None:
    [txt] = make_resolver(dns_server).resolve("sel._domainkey.example.test", "TXT")
    assert len(txt.strings) == 2
    assert len(txt.strings[0]) == 255
    assert b"".join(txt.strings).decode() == LONG_DKIM


def test_answers_are_authoritative(dns_server: DNSServerHandle) -> None:
    query = dns.message.make_query("example.test", "A")
    response = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=3)
    assert response.flags & dns.flags.AA


def test_unknown_name_answers_nxdomain(dns_server: DNSServerHandle) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        make_resolver(dns_server).resolve("nope.example.test", "A")


def test_existing_name_without_that_type_answers_nodata(dns_server: DNSServerHandle) -> None:
    query = dns.message.make_query("mx.example.test", "TXT")
    response = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=3)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    with pytest.raises(dns.resolver.NoAnswer):
        make_resolver(dns_server).resolve("mx.example.test", "TXT")


def test_empty_non_terminal_above_a_record_answers_nodata_not_nxdomain(
    dns_server: DNSServerHandle,
) -> None:
    with pytest.raises(dns.resolver.NoAnswer):
        make_resolver(dns_server).resolve("_domainkey.example.test", "TXT")


def test_servfail_name_and_names_below_it_raise_no_nameservers(
    dns_server: DNSServerHandle,
) -> None:
    resolver = make_resolver(dns_server)
    for name in ("servfail.test", "_spf.deep.servfail.test"):
        with pytest.raises(dns.resolver.NoNameservers):
            resolver.resolve(name, "TXT")


def test_timeout_name_gets_no_answer_so_the_client_times_out(
    dns_server: DNSServerHandle,
) -> None:
    with pytest.raises(dns.exception.Timeout):
        make_resolver(dns_server, lifetime=1.0).resolve("mx.timeout.test", "A")


def test_tcp_query_gets_the_same_answer_as_udp(dns_server: DNSServerHandle) -> None:
    query = dns.message.make_query("sel._domainkey.example.test", "TXT")
    response = dns.query.tcp(query, dns_server.host, port=dns_server.port, timeout=3)
    [rrset] = response.answer
    assert b"".join(rrset[0].strings).decode() == LONG_DKIM
    assert response.flags & dns.flags.AA


def test_udp_answer_too_big_for_512_bytes_is_truncated_and_resolver_retries_over_tcp(
    dns_server: DNSServerHandle,
) -> None:
    # Without EDNS a client only accepts 512 bytes over UDP.
    query = dns.message.make_query("big._domainkey.example.test", "TXT", use_edns=False)
    response = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=3)
    assert response.flags & dns.flags.TC
    assert response.answer == []
    [txt] = make_resolver(dns_server).resolve("big._domainkey.example.test", "TXT")
    assert b"".join(txt.strings).decode() == HUGE_DKIM


def test_update_changes_the_answer(private_dns_server: DNSServerHandle) -> None:
    resolver = make_resolver(private_dns_server)
    assert texts(resolver.resolve("example.test", "A")) == ["127.0.0.1"]
    changed = {
        "records": {"example.test": [{"type": "A", "value": "127.0.0.5"}]},
        "servfail": ["now-failing.example.test"],
    }
    private_dns_server.update(changed)
    assert texts(resolver.resolve("example.test", "A")) == ["127.0.0.5"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("mx.example.test", "A")
    with pytest.raises(dns.resolver.NoNameservers):
        resolver.resolve("now-failing.example.test", "A")
    # A second update must be waited for too, not satisfied by the first reload.
    private_dns_server.update(ZONES)
    assert texts(resolver.resolve("example.test", "A")) == ["127.0.0.1"]


def test_invalid_zone_data_is_rejected_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MX"):
        start_dns_server({"records": {"x.test": [{"type": "MX", "value": "mx"}]}}, tmp_path)
    with pytest.raises(ValueError, match="unsupported"):
        start_dns_server({"records": {"x.test": [{"type": "SRV", "value": "x"}]}}, tmp_path)


def test_stop_terminates_the_process_and_is_idempotent(tmp_path: Path) -> None:
    handle = start_dns_server(ZONES, tmp_path)
    assert handle.process.poll() is None
    handle.stop()
    # SIGTERM means a clean reactor shutdown, i.e. exit status 0.
    assert handle.process.returncode == 0
    handle.stop()


def test_two_servers_can_share_a_workdir(tmp_path: Path) -> None:
    with start_dns_server(ZONES, tmp_path) as first, start_dns_server(ZONES, tmp_path) as second:
        assert first.port != second.port
        assert texts(make_resolver(second).resolve("example.test", "A")) == ["127.0.0.1"]
    assert first.process.returncode is not None
    assert second.process.returncode is not None


def test_sighup_with_broken_zones_keeps_serving_the_old_data(
    private_dns_server: DNSServerHandle,
) -> None:
    private_dns_server.zones_path.write_text("{not json", encoding="utf-8")
    private_dns_server.process.send_signal(signal.SIGHUP)
    # update() with valid data afterwards still works: the server survived.
    private_dns_server.update(ZONES)
    assert texts(make_resolver(private_dns_server).resolve("example.test", "A")) == ["127.0.0.1"]
