"""Per-address connection counting shared by every listener."""

from __future__ import annotations

import ipaddress


def address_key(peer: str) -> str:
    """The unit one client is counted by: an IPv4 address, or the /64 of an IPv6 one.

    One IPv6 host is routinely given a whole /64, so counting single addresses would let it
    start afresh from another of its 2**64 addresses.
    """
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ConnectionCounter:
    """Open connections per client address (an IPv6 /64 counts as one client) or account."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        """Count one more connection from `address`; False (and not counted) past the limit."""
        address = address_key(address)
        count = self._counts.get(address, 0)
        if count >= self.limit:
            return False
        self._counts[address] = count + 1
        return True

    def release(self, address: str) -> None:
        address = address_key(address)
        remaining = self._counts.get(address, 1) - 1
        if remaining > 0:
            self._counts[address] = remaining
        else:
            self._counts.pop(address, None)
