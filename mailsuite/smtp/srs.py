"""Sender Rewriting Scheme: envelope senders of forwarded mail, so SPF passes at the next hop.

The address forms, hash and timestamp are those of Mail::SRS's "Guarded" scheme, which
libsrs2, postsrsd and Exim also use, so addresses rewritten here can be reversed by them given
the same secret and the other way round:

    SRS0=HHHH=TT=orighost=origlocal@srs_domain
    SRS1=HHHH=firsthost==HHHH=TT=orighost=origlocal@srs_domain

HHHH is a prefix of the base64 HMAC-SHA1 of the lower-cased fields; TT is the day the
address was made, in two base32 characters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time

_SEPARATORS = "=+-"
_SRS_RE = re.compile(r"^SRS[01][=+-]", re.IGNORECASE)
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
# Two base32 characters: the day number is kept modulo 1024, so stamps repeat every ~2.8 years.
_TICKS = len(_BASE32) ** 2
_SECONDS_PER_DAY = 86400


class SRSError(ValueError):
    """An address that is not SRS, or whose hash or timestamp does not check out."""


class SRS:
    """Forward (rewrite) and reverse SRS addresses with one secret."""

    def __init__(self, secret: bytes, max_age_days: int = 21, hash_length: int = 4) -> None:
        if not secret:
            raise ValueError("SRS needs a secret")
        self._secret = secret
        self._max_age = max_age_days
        self._hash_length = hash_length

    def forward(self, sender: str, srs_domain: str, today: int | None = None) -> str:
        """The address to use as envelope sender when forwarding mail from `sender`."""
        if not sender:
            return sender
        local, host = _split(sender)
        if host.lower() == srs_domain.lower():
            return sender
        if local[:4].upper() == "SRS1" and local[4:5] in _SEPARATORS:
            # Rewritten by two forwarders already: keep the first one's host and SRS0 part,
            # vouched for with our own hash, so the address does not grow any further.
            parts = local[5:].split("=", 2)
            if len(parts) == 3 and parts[1] and parts[2]:
                _, first_host, srs0_rest = parts
                return self._srs1(first_host, srs0_rest, srs_domain)
        if local[:4].upper() == "SRS0" and local[4:5] in _SEPARATORS:
            # The SRS0 separator is kept, hence the "==" of the SRS1 form.
            return self._srs1(host, local[4:], srs_domain)
        stamp = _timestamp(self._today(today))
        digest = self._hash(stamp, host, local)
        return f"SRS0={digest}={stamp}={host}={local}@{srs_domain}"

    def reverse(self, address: str, today: int | None = None) -> str:
        """The address an SRS address was made from; SRSError when it is not valid."""
        local, _ = _split(address)
        if not self.is_srs(local):
            raise SRSError(f"not an SRS address: {address!r}")
        tag, rest = local[:4].upper(), local[5:]
        if tag == "SRS1":
            parts = rest.split("=", 2)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise SRSError(f"malformed SRS1 address: {address!r}")
            digest, first_host, srs0_rest = parts
            self._check_hash(digest, first_host, srs0_rest)
            return f"SRS0{srs0_rest}@{first_host}"
        parts = rest.split("=", 3)
        if len(parts) != 4 or not all(parts):
            raise SRSError(f"malformed SRS0 address: {address!r}")
        digest, stamp, host, orig_local = parts
        self._check_hash(digest, stamp, host, orig_local)
        self._check_timestamp(stamp, self._today(today))
        return f"{orig_local}@{host}"

    @staticmethod
    def is_srs(local_part: str) -> bool:
        """True when `local_part` has the SRS0 or SRS1 form."""
        return _SRS_RE.match(local_part) is not None

    def _srs1(self, first_host: str, srs0_rest: str, srs_domain: str) -> str:
        digest = self._hash(first_host, srs0_rest)
        return f"SRS1={digest}={first_host}={srs0_rest}@{srs_domain}"

    def _hash(self, *fields: str, length: int | None = None) -> str:
        # Lower-cased as Mail::SRS does, so an address a mail system lower-cased still checks.
        data = "".join(fields).lower().encode("utf-8")
        mac = hmac.new(self._secret, data, hashlib.sha1).digest()
        return base64.b64encode(mac).decode("ascii")[:length or self._hash_length]

    def _check_hash(self, digest: str, *fields: str) -> None:
        if len(digest) < self._hash_length:
            raise SRSError("SRS hash too short")
        expected = self._hash(*fields, length=len(digest))
        # Case-insensitive because the whole address may have been lower-cased on the way.
        if not hmac.compare_digest(digest.lower().encode("utf-8"),
                                   expected.lower().encode("ascii")):
            raise SRSError("SRS hash does not match")

    def _check_timestamp(self, stamp: str, today: int) -> None:
        stamp = stamp.upper()
        if len(stamp) != 2 or any(ch not in _BASE32 for ch in stamp):
            raise SRSError(f"bad SRS timestamp: {stamp!r}")
        then = _BASE32.index(stamp[0]) * len(_BASE32) + _BASE32.index(stamp[1])
        # A stamp "ahead" of today is from the previous cycle, so it counts as old.
        age = (today - then) % _TICKS
        if age > self._max_age:
            raise SRSError("SRS address has expired")

    @staticmethod
    def _today(today: int | None) -> int:
        return int(time.time()) // _SECONDS_PER_DAY if today is None else today


def _timestamp(day: int) -> str:
    day %= _TICKS
    return _BASE32[day // len(_BASE32)] + _BASE32[day % len(_BASE32)]


def _split(address: str) -> tuple[str, str]:
    local, at, host = address.rpartition("@")
    if not at or not local or not host:
        raise SRSError(f"not an address: {address!r}")
    return local, host
