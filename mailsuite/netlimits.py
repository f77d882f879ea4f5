"""Per-address connection counting shared by every listener."""

from __future__ import annotations


class ConnectionCounter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        """Count one more connection from `address`; False (and not counted) past the limit."""
        count = self._counts.get(address, 0)
        if count >= self.limit:
            return False
        self._counts[address] = count + 1
        return True

    def release(self, address: str) -> None:
        remaining = self._counts.get(address, 1) - 1
        if remaining > 0:
            self._counts[address] = remaining
        else:
            self._counts.pop(address, None)
