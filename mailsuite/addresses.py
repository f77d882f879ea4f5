"""Mail addresses: RFC 5321 path syntax, and the normal form the store keys accounts on.

The parser is strict on purpose: relay decisions are made on its output, so `%`, `!`,
quoted local parts and source routes are kept as the opaque local-part text they are and
never reinterpreted as routing.
"""

from __future__ import annotations

import contextlib
import email.errors
import email.header
import re
import unicodedata
from dataclasses import dataclass

# RFC 5321 4.1.2 / RFC 5322 atext; RFC 6531 extends atext with any non-ASCII UTF-8.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}"
_LABEL += r"[A-Za-z0-9\u0080-\U0010ffff])?)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ADDRESS_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]")
_SOURCE_ROUTE = re.compile(rf"@{_DOMAIN.pattern}(?:,@{_DOMAIN.pattern})*:")


# Text that reads as an address anywhere in a header value (display names, comments and
# quoted strings included), matched around each "@": the local part that ends right before
# it (matched on the reversed text, so anchored), the domain that follows. Every repetition
# is bounded, so the cost is linear.
_LOCAL_REVERSED = re.compile(
    r'"[^"\r\n]{0,64}"|[A-Za-z0-9!#$%&\'*+/=?^_`{|}~.\-\u0080-\U0010ffff]{1,64}')
_DOMAIN_AFTER = re.compile(
    r"(?:[A-Za-z0-9\-\u0080-\U0010ffff]{1,63}\.){1,8}[A-Za-z0-9\-\u0080-\U0010ffff]{1,63}")


class AddressError(ValueError):
    """Not a valid address; the message says why."""


@dataclass(frozen=True)
class Address:
    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def normal(self) -> str:
        """The lookup key: both halves lower-cased (we treat local parts case-insensitively)."""
        return f"{self.local.lower()}@{self.domain.lower().rstrip('.')}"

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()

    @property
    def is_ip_literal(self) -> bool:
        return self.domain.startswith("[")


def parse_mailbox(text: str) -> Address:
    """Parse `local@domain` (RFC 5321 Mailbox), raising AddressError."""
    if len(text) > 320:
        raise AddressError("address too long")
    if text.startswith('"'):
        quoted = _QUOTED.match(text)
        if not quoted or text[quoted.end():quoted.end() + 1] != "@":
            raise AddressError("malformed quoted local part")
        local, domain = text[:quoted.end()], text[quoted.end() + 1:]
    else:
        local, sep, domain = text.rpartition("@")
        if not sep or not _DOT_STRING.fullmatch(local):
            raise AddressError("malformed local part")
    if len(local.encode()) > 64:
        raise AddressError("local part longer than 64 octets")
    if not (_DOMAIN.fullmatch(domain) or _ADDRESS_LITERAL.fullmatch(domain)):
        raise AddressError("malformed domain")
    if len(domain) > 255:
        raise AddressError("domain too long")
    return Address(local, domain)


def parse_path(text: str) -> Address | None:
    """Parse an SMTP reverse- or forward-path `<...>`; `<>` gives None.

    A source route (`<@a,@b:user@c>`) is accepted and ignored, as RFC 5321 4.1.1.3 asks:
    the mailbox after it is the address that counts.
    """
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        return None
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end():]
    return parse_mailbox(inner)


def parse_domain(text: str) -> str:
    """A domain name as the admin gives it, lower-cased; raises AddressError."""
    name = text.strip().lower().rstrip(".")
    if not _DOMAIN.fullmatch(name) or "." not in name or len(name) > 253:
        raise AddressError(f"invalid domain name: {text!r}")
    return name


def parse_account_address(text: str) -> Address:
    """An address as the admin gives it for an account or alias: a plain dot-atom mailbox."""
    address = parse_mailbox(text.strip())
    if address.local.startswith('"') or address.is_ip_literal:
        raise AddressError(f"invalid address: {text!r}")
    return Address(address.local, parse_domain(address.domain))


def mentioned_addresses(value: str) -> list[str]:
    """Every address a reader could see in a header field value, lower-cased: those in
    display names and comments too, in the raw text and after decoding RFC 2047 encoded
    words, with look-alike characters (a full-width @) folded by NFKC."""
    texts = [value]
    # Undecodable words stay as they are; the raw text is searched either way.
    with contextlib.suppress(email.errors.HeaderParseError, LookupError, UnicodeError,
                             ValueError):
        texts.append(str(email.header.make_header(email.header.decode_header(value))))
    found: dict[str, None] = {}
    for text in (unicodedata.normalize("NFKC", t) for t in texts):
        at = text.find("@")
        while at >= 0:
            domain = _DOMAIN_AFTER.match(text, at + 1)
            if domain:
                local = _LOCAL_REVERSED.match(text[max(0, at - 66):at][::-1])
                address = (local.group(0)[::-1] if local else "") + "@" + domain.group(0)
                found[address.lower().rstrip(".")] = None
            at = text.find("@", at + 1)
    return list(found)
