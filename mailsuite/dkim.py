"""DKIM keys (RSA and Ed25519, RFC 6376 and RFC 8463) and signing of outgoing mail.

Keys are stored as PKCS#8 PEM whatever the algorithm; dkimpy wants a PEM RSA key but the raw
Ed25519 seed in base64, so the conversion happens here. Signing is CPU work: call it in a
thread.
"""

from __future__ import annotations

import base64
import functools
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailsuite.dkimlinear import parse_message

RSA_SHA256 = "rsa-sha256"
ED25519_SHA256 = "ed25519-sha256"
ALGORITHMS = (RSA_SHA256, ED25519_SHA256)

_SELECTOR_SUFFIX = {RSA_SHA256: "r", ED25519_SHA256: "e"}
_CANONICALIZE = (b"relaxed", b"relaxed")
# A TXT character-string holds at most 255 octets (RFC 1035 3.3.14).
_TXT_CHUNK = 255


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    private_key: bytes  # PKCS#8 PEM


def generate_key(domain: str, algorithm: str = RSA_SHA256, bits: int = 2048,
                 when: datetime | None = None) -> DKIMKey:
    """A new key for `domain` with a fresh selector such as "ms202611a3f9r"."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported DKIM algorithm: {algorithm!r}")
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == RSA_SHA256:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    when = when or datetime.now(UTC)
    # The month makes rotation visible in DNS; the random part keeps two keys made in one
    # month (or on two servers) apart.
    selector = f"ms{when:%Y%m}{secrets.token_hex(2)}{_SELECTOR_SUFFIX[algorithm]}"
    return DKIMKey(domain=domain.lower().rstrip("."), selector=selector, algorithm=algorithm,
                   private_key=pem)


def new_domain_keys(domain: str, rsa_bits: int, ed25519_too: bool) -> list[DKIMKey]:
    """The keys a new domain (or a rotation) gets: RSA, and Ed25519 when configured."""
    keys = [generate_key(domain, RSA_SHA256, bits=rsa_bits)]
    if ed25519_too:
        keys.append(generate_key(domain, ED25519_SHA256))
    return keys


def public_record(key: DKIMKey) -> str:
    """The TXT value to publish at <selector>._domainkey.<domain>."""
    private = _load_private(key)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


def sign_message(raw: bytes, keys: Sequence[DKIMKey]) -> bytes:
    """`raw` (CRLF lines, not dot-stuffed) with one DKIM-Signature per key prepended, RSA first.

    Raises dkim.DKIMException when the header section cannot be parsed.
    """
    ordered = sorted(keys, key=lambda k: k.algorithm != RSA_SHA256)
    # Split by us, not by dkimpy, whose parser is quadratic in a long folded field.
    message = parse_message(raw)
    if ordered and message.defects:
        raise dkim.MessageFormatError(message.defects[0])
    signatures = []
    for key in ordered:
        signer = dkim.DKIM(signature_algorithm=key.algorithm.encode("ascii"), linesep=b"\r\n")
        signer.headers = [list(f) for f in message.fields]
        signer.body = message.body
        # FROZEN already holds "from"; stated again so a dkimpy default change cannot drop
        # the oversigning that stops a second From from being added after signing.
        signer.add_frozen((b"from",))
        signatures.append(signer.sign(
            key.selector.encode("ascii"), key.domain.encode("ascii"), _dkimpy_private_key(key),
            canonicalize=_CANONICALIZE, length=False,
        ))
    # Each signature covers the message without the others, so their order among themselves
    # does not matter to verifiers; they never sign DKIM-Signature fields.
    return b"".join(signatures) + raw


def dns_records(domain: str, hostname: str,
                keys: Sequence[DKIMKey]) -> list[tuple[str, str, str]]:
    """(owner name, type, value) of MX, SPF, DKIM and DMARC records for `domain`; a TXT value
    is the whole text, which format_zone splits into strings."""
    domain = domain.lower().rstrip(".")
    hostname = hostname.lower().rstrip(".")
    records = [
        (f"{domain}.", "MX", f"10 {hostname}."),
        (f"{domain}.", "TXT", f"v=spf1 mx a:{hostname} ~all"),
    ]
    for key in keys:
        records.append((f"{key.selector}._domainkey.{domain}.", "TXT", public_record(key)))
    records.append((f"_dmarc.{domain}.", "TXT",
                    f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"))
    return records


def format_zone(records: Iterable[tuple[str, str, str]]) -> str:
    """Zone-file lines "name<TAB>IN<TAB>TYPE<TAB>value", one per record."""
    return "".join(f"{name}\tIN\t{rtype}\t{_txt_strings(value) if rtype == 'TXT' else value}\n"
                   for name, rtype, value in records)


def _txt_strings(value: str) -> str:
    """`value` as space-separated quoted strings of at most 255 characters each."""
    chunks = [value[i:i + _TXT_CHUNK] for i in range(0, len(value), _TXT_CHUNK)] or [""]
    return " ".join(f'"{chunk}"' for chunk in chunks)


def _load_private(key: DKIMKey) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    private = serialization.load_pem_private_key(key.private_key, password=None)
    if key.algorithm == RSA_SHA256 and isinstance(private, rsa.RSAPrivateKey):
        return private
    if key.algorithm == ED25519_SHA256 and isinstance(private, ed25519.Ed25519PrivateKey):
        return private
    raise ValueError(f"DKIM key {key.selector} is not a usable {key.algorithm} key")


@functools.lru_cache(maxsize=1024)
def _dkimpy_private_key(key: DKIMKey) -> bytes:
    # Cached: loading a PEM RSA key checks it, ~40 ms, which would be most of a signature.
    private = _load_private(key)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        return base64.b64encode(seed)
    # dkimpy finds the PEM body with a regex that only matches LF line ends, so a key that
    # went through CRLF storage is re-serialised rather than passed through.
    return private.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
