"""Password logins shared by every protocol that takes them (POP3, IMAP, SMTP AUTH).

The password may also be an API key (ms_...) whose reach includes the account and which has
the scope the protocol needs (messages:read to read, messages:send to submit): an agent's
key opens its inbox in a mail client too. Keys are checked by hash, without bcrypt; a
revoked or expired key stops opening new sessions at once.

Failures are counted per address (IPv6: per /64, see netlimits.address_key). Every failure
is answered after a short delay, and each one makes that address wait longer before its next
password is even looked at; past a budget the protocol is told to hang up, and new
connections are refused at the greeting until the address has cooled off. A success clears
the count. One address has at most a few logins
checked at once (the rest wait their turn), and bcrypt runs in a small pool of its own,
so an attacker can neither keep the CPU busy nor delay other addresses' logins for long.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailsuite import apikeys
from mailsuite.config import AuthConfig
from mailsuite.netlimits import address_key
from mailsuite.passwords import check_password, dummy_hash
from mailsuite.store import AsyncStore

log = Logger(namespace="mailsuite.auth")


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
    """login(username, password, peer, scope) → the account, or None."""

    #: seconds a failure is answered late; and an address waits as long before its next
    #: check after one failure, doubling per failure
    base_delay = 0.5
    max_delay = 15.0
    #: above this many tracked addresses, forgiven ones are swept out
    sweep_at = 10000
    #: the penalty stops doubling long before this (and 2**n stays a small number)
    _max_exponent = 32

    def __init__(self, store: AsyncStore, reactor: Any, settings: AuthConfig) -> None:
        self.store = store
        self.reactor = reactor
        self.settings = settings
        self._failures: dict[str, _Failures] = {}
        self._in_flight: dict[str, defer.DeferredSemaphore] = {}
        self._pool: ThreadPool | None = None
        self._next_sweep = self.sweep_at

    def login(self, username: str, password: str, peer: str,
              scope: str = "messages:read") -> defer.Deferred:
        """`scope` is what an API key given as the password must grant."""
        key = address_key(peer)
        slots = self._in_flight.get(key)
        if slots is None:
            slots = self._in_flight[key] = defer.DeferredSemaphore(
                self.settings.max_logins_in_flight)
        d = slots.run(self._attempt, username, password, key, scope)
        d.addBoth(self._slot_freed, key, slots)
        return d

    def _slot_freed(self, result: Any, key: str, slots: defer.DeferredSemaphore) -> Any:
        if slots.tokens == slots.limit and self._in_flight.get(key) is slots:
            del self._in_flight[key]
        return result

    @defer.inlineCallbacks
    def _attempt(self, username: str, password: str, key: str, scope: str) -> Any:
        # An address over its budget is answered at once (and hung up on by the protocol):
        # its queued attempts neither wait nor hash. Otherwise the penalty comes first: its
        # next guess is not looked at before it has waited, however many connections it
        # spreads its guesses over.
        if self.cooling_off(key):
            return None
        delay = self.penalty(key)
        if delay > 0:
            yield task.deferLater(self.reactor, delay, lambda: None)
            if self.cooling_off(key):
                return None
        account = yield self.store.account_get(username.strip().lower())
        ok = False
        if account is not None and password.startswith(apikeys.SECRET_PREFIX):
            api_key = yield self.store.api_key_for_secret(password)
            ok = (api_key is not None and apikeys.grants(api_key.scopes, scope)
                  and apikeys.reaches_inbox(api_key.domains, api_key.inboxes, account.address))
        if not ok:
            hashed = account.password_hash if account is not None else None
            ok = yield threads.deferToThreadPool(self.reactor, self._password_pool(),
                                                 self._check, password, hashed)
        if ok and account is not None:
            self._failures.pop(key, None)
            return account
        self._failed(key)
        # A failure is also answered late, still holding the slot: one address cannot
        # learn more than a few answers a second, even before its penalties grow.
        yield task.deferLater(self.reactor, self.base_delay, lambda: None)
        return None

    def _check(self, password: str, hashed: str | None) -> bool:
        """In a password thread. An unknown user costs one bcrypt at the configured cost."""
        if hashed is None:
            check_password(password, dummy_hash(self.settings.bcrypt_rounds))
            return False
        return check_password(password, hashed)

    def _password_pool(self) -> ThreadPool:
        # Started at the first login, so that no thread exists before twistd has forked.
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self.settings.password_threads,
                                    name="mailsuite-passwords")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return self._pool

    def _failed(self, key: str) -> None:
        if len(self._failures) >= self._next_sweep:
            for other in list(self._failures):
                self._record(other)
            # Many addresses still within cool_off: sweep again only once they have doubled.
            self._next_sweep = max(self.sweep_at, 2 * len(self._failures))
        record = self._failures.setdefault(key, _Failures())
        record.count += 1
        record.last = time.monotonic()
        if record.count == self.settings.max_failures:
            # Once per episode: the refused connections themselves are not logged.
            log.info("{peer} failed {count} logins: refused until quiet for {cool_off:g}s",
                     peer=key, count=record.count, cool_off=self.settings.cool_off)

    def _record(self, key: str) -> _Failures | None:
        """The failures of `key`, forgotten once it has been quiet for cool_off seconds."""
        record = self._failures.get(key)
        if record is not None and time.monotonic() - record.last > self.settings.cool_off:
            del self._failures[key]
            return None
        return record

    def penalty(self, peer: str) -> float:
        """Seconds the next login from `peer` waits before its password is checked."""
        record = self._record(address_key(peer))
        if record is None:
            return 0.0
        exponent = min(record.count - 1, self._max_exponent)
        return min(self.max_delay, self.base_delay * 2 ** exponent)

    def cooling_off(self, peer: str) -> bool:
        """Whether `peer` has used up its failure budget and must not try again yet."""
        record = self._record(address_key(peer))
        return record is not None and record.count >= self.settings.max_failures

    def should_disconnect(self, peer: str) -> bool:
        return self.cooling_off(peer)
