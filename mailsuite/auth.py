"""Password logins shared by every protocol that takes them (POP3, IMAP, SMTP AUTH).

bcrypt runs in a thread. Each failed login from an address makes that address wait longer
for its next answer, and past a limit the protocol is told to hang up; a success clears it.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task, threads

from mailsuite.passwords import check_password
from mailsuite.store import AccountRow, AsyncStore

# Checked against when the account does not exist, so both paths cost one bcrypt.
_DUMMY_HASH = "$2b$12$i9gy4992c2tW2b2IoD/weuBnK7OBlju51bPEAupiJ/2lQcTAAMQjm"


class SASLError(ValueError):
    """A malformed or refused SASL exchange."""


def decode_sasl_plain(encoded: str) -> tuple[str, str]:
    """(username, password) from a base64 SASL PLAIN response (RFC 4616).

    An authorization identity other than the user itself is refused: nobody may act as
    another account here.
    """
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
        authzid, authcid, password = raw.decode("utf-8").split("\x00")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise SASLError("malformed PLAIN response") from exc
    if not authcid or not password:
        raise SASLError("malformed PLAIN response")
    if authzid and authzid.lower() != authcid.lower():
        raise SASLError("authorization identity must be the user itself")
    return authcid, password


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


class Authenticator:
    """login(username, password, peer) → the account, or None after the penalty delay."""

    #: seconds of delay for the first failure; doubles with each further one
    base_delay = 0.5
    max_delay = 15.0
    #: failures after which the protocol should close the connection
    max_failures = 10
    #: a quiet address is forgiven after this many seconds
    forget_after = 900.0

    def __init__(self, store: AsyncStore, reactor: Any) -> None:
        self.store = store
        self.reactor = reactor
        self._failures: dict[str, _Failures] = {}

    def login(self, username: str, password: str, peer: str) -> defer.Deferred:
        d = self.store.account_get(username.strip().lower())
        d.addCallback(self._check, password)
        d.addCallback(self._settle, peer)
        return d

    def _check(self, account: AccountRow | None, password: str) -> defer.Deferred:
        hashed = account.password_hash if account else _DUMMY_HASH
        pool = self.reactor.getThreadPool()
        d = threads.deferToThreadPool(self.reactor, pool, check_password, password, hashed)
        d.addCallback(lambda ok: account if ok and account else None)
        return d

    def _settle(self, account: AccountRow | None, peer: str) -> Any:
        if account is not None:
            self._failures.pop(peer, None)
            return account
        delay = self.penalty(peer)
        record = self._failures.setdefault(peer, _Failures())
        record.count += 1
        record.last = time.monotonic()
        return task.deferLater(self.reactor, delay, lambda: None)

    def penalty(self, peer: str) -> float:
        """Seconds the next failed answer to `peer` will wait."""
        record = self._failures.get(peer)
        if record is None or time.monotonic() - record.last > self.forget_after:
            self._failures.pop(peer, None)
            return self.base_delay
        return min(self.max_delay, self.base_delay * 2 ** record.count)

    def should_disconnect(self, peer: str) -> bool:
        record = self._failures.get(peer)
        return record is not None and record.count >= self.max_failures
