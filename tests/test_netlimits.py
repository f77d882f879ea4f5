"""What one client is counted as: an IPv4 address, an IPv6 /64 (loopback has no other IPv6
addresses to connect from, so this is tested here rather than over sockets)."""

from __future__ import annotations

from mailsuite.netlimits import ConnectionCounter, address_key


def test_ipv6_addresses_of_one_64_count_as_one() -> None:
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff:ffff:ffff:fffe")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"


def test_ipv4_addresses_count_alone_also_when_mapped() -> None:
    assert address_key("192.0.2.1") != address_key("192.0.2.2")
    assert address_key("::ffff:192.0.2.1") == address_key("192.0.2.1") == "192.0.2.1"


def test_anything_else_is_its_own_key() -> None:
    assert address_key("unix-socket") == "unix-socket"


def test_connection_caps_count_an_ipv6_64_as_one_client() -> None:
    counter = ConnectionCounter(2)
    assert counter.acquire("2001:db8:1:2::1") and counter.acquire("2001:db8:1:2::99")
    assert not counter.acquire("2001:db8:1:2:abcd::1")
    assert counter.acquire("2001:db8:1:3::1") and counter.acquire("192.0.2.1")
    counter.release("2001:db8:1:2::99")
    assert counter.acquire("2001:db8:1:2::7")
