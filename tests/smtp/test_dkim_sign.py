"""DKIM signing of outgoing mail, checked by dkimpy's verifier against our published records."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import dkim
import pytest

from mailsuite.dkim import (
    DKIMKey,
    dns_records,
    format_zone,
    generate_key,
    public_record,
    sign_message,
)

DOMAIN = "example.org"
LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Date: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <a1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"the numbers are attached.\r\n"
)


@pytest.fixture(scope="module")
def rsa_key() -> DKIMKey:
    return generate_key(DOMAIN)


@pytest.fixture(scope="module")
def ed_key() -> DKIMKey:
    return generate_key(DOMAIN, "ed25519-sha256")


def dnsfunc_for(*keys: DKIMKey):  # type: ignore[no-untyped-def]
    records = {
        f"{key.selector}._domainkey.{key.domain}.".encode(): public_record(key).encode()
        for key in keys
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


def signature_fields(signed: bytes) -> list[dict[bytes, bytes]]:
    signer = dkim.DKIM(signed)
    return [
        dkim.util.parse_tag_value(value)
        for name, value in signer.headers
        if name.lower() == b"dkim-signature"
    ]


def verify_all(signed: bytes, *keys: DKIMKey) -> list[bool]:
    """One verdict per DKIM-Signature, top first."""
    verdicts = []
    for i in range(len(signature_fields(signed))):
        # DKIM.verify raises on a body hash mismatch instead of returning False.
        try:
            verdicts.append(bool(dkim.DKIM(signed).verify(idx=i, dnsfunc=dnsfunc_for(*keys))))
        except dkim.DKIMException:
            verdicts.append(False)
    return verdicts


def test_rsa_signature_verifies(rsa_key: DKIMKey) -> None:
    signed = sign_message(MESSAGE, [rsa_key])
    assert signed.endswith(MESSAGE)
    assert verify_all(signed, rsa_key) == [True]


def test_rsa_and_ed25519_both_verify_rsa_first(rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    signed = sign_message(MESSAGE, [ed_key, rsa_key])
    fields = signature_fields(signed)
    assert [f[b"a"] for f in fields] == [b"rsa-sha256", b"ed25519-sha256"]
    assert [f[b"s"].decode() for f in fields] == [rsa_key.selector, ed_key.selector]
    assert verify_all(signed, rsa_key, ed_key) == [True, True]


def test_signature_shape(rsa_key: DKIMKey) -> None:
    signed = sign_message(MESSAGE, [rsa_key])
    (fields,) = signature_fields(signed)
    assert b"l" not in fields
    assert fields[b"c"] == b"relaxed/relaxed"
    assert fields[b"d"] == DOMAIN.encode()
    signed_headers = [h.strip() for h in re.sub(rb"\s+", b"", fields[b"h"]).split(b":")]
    assert signed_headers.count(b"from") == 2
    for name in (b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type"):
        assert name in signed_headers


def test_crlf_kept_everywhere(rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    signed = sign_message(MESSAGE, [rsa_key, ed_key])
    assert re.search(rb"(?<!\r)\n", signed) is None
    assert re.search(rb"\r(?!\n)", signed) is None
    header_block = signed[: len(signed) - len(MESSAGE)]
    # Folded: continuation lines start with whitespace and no line is overly long.
    lines = header_block.split(b"\r\n")[:-1]
    assert all(line.startswith((b"DKIM-Signature:", b" ", b"\t")) for line in lines)
    assert all(len(line) <= 78 for line in lines)


def test_utf8_subject_and_body(rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    message = (
        "From: Jörg <jörg@example.org>\r\n"
        "To: Zoë <zoë@example.net>\r\n"
        "Subject: Grüße aus Köln — ünïcödé\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Schöne Grüße,\r\nJörg ☃\r\n"
    ).encode()
    signed = sign_message(message, [rsa_key, ed_key])
    assert verify_all(signed, rsa_key, ed_key) == [True, True]


def test_body_line_starting_with_dot(rsa_key: DKIMKey) -> None:
    message = MESSAGE + b".\r\n..two dots\r\n.hidden\r\n"
    signed = sign_message(message, [rsa_key])
    assert signed.endswith(b".\r\n..two dots\r\n.hidden\r\n")
    assert verify_all(signed, rsa_key) == [True]


def test_modified_message_fails(rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    signed = sign_message(MESSAGE, [rsa_key, ed_key])
    tampered_body = signed.replace(b"numbers are attached", b"numbers are attacked")
    assert verify_all(tampered_body, rsa_key, ed_key) == [False, False]
    tampered_header = signed.replace(b"Subject: quarterly", b"Subject: yearly")
    assert verify_all(tampered_header, rsa_key, ed_key) == [False, False]
    second_from = b"From: Mallory <m@evil.test>\r\n" + signed
    assert verify_all(second_from, rsa_key, ed_key) == [False, False]


def test_no_keys_returns_message_unchanged() -> None:
    assert sign_message(MESSAGE, []) == MESSAGE


def test_selector_is_a_fresh_dns_label(rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    when = datetime(2026, 11, 3, tzinfo=UTC)
    first = generate_key(DOMAIN, "ed25519-sha256", when=when)
    second = generate_key(DOMAIN, "ed25519-sha256", when=when)
    assert first.selector != second.selector
    assert re.fullmatch(r"ms202611[0-9a-f]{4}e", first.selector)
    assert re.fullmatch(r"ms\d{6}[0-9a-f]{4}r", rsa_key.selector)
    for key in (rsa_key, ed_key, first, second):
        assert LABEL_RE.match(key.selector)
        assert key.private_key.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_public_records(rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    assert public_record(rsa_key).startswith("v=DKIM1; k=rsa; p=MII")
    ed = public_record(ed_key)
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", ed)


def test_unknown_algorithm_refused() -> None:
    with pytest.raises(ValueError):
        generate_key(DOMAIN, "rsa-sha1")


def test_dns_records(rsa_key: DKIMKey, ed_key: DKIMKey) -> None:
    records = dns_records(DOMAIN, "mail.example.org", [rsa_key, ed_key])
    assert records[0] == ("example.org.", "MX", "10 mail.example.org.")
    assert records[1] == ("example.org.", "TXT", "v=spf1 mx a:mail.example.org ~all")
    assert records[-1] == (
        "_dmarc.example.org.", "TXT",
        "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org",
    )
    dkim_records = {name: value for name, rtype, value in records[2:-1] if rtype == "TXT"}
    assert set(dkim_records) == {
        f"{rsa_key.selector}._domainkey.example.org.",
        f"{ed_key.selector}._domainkey.example.org.",
    }
    ed_value = dkim_records[f"{ed_key.selector}._domainkey.example.org."]
    assert ed_value == public_record(ed_key)

    zone = format_zone(records)
    assert zone.splitlines()[0] == "example.org.\tIN\tMX\t10 mail.example.org."
    assert zone.splitlines()[1] == 'example.org.\tIN\tTXT\t"v=spf1 mx a:mail.example.org ~all"'
    assert len(zone.splitlines()) == 5


def test_long_dkim_txt_split_into_255_char_strings(rsa_key: DKIMKey) -> None:
    line, = [line for line in format_zone(dns_records(DOMAIN, "mx.example.org", [rsa_key]))
             .splitlines() if "_domainkey" in line]
    value = line.split("\t")[3]
    strings = re.findall(r'"([^"]*)"', value)
    assert len(strings) >= 2
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == public_record(rsa_key)
    assert value == " ".join(f'"{s}"' for s in strings)


def test_key_stored_with_crlf_line_ends_still_signs(rsa_key: DKIMKey) -> None:
    # dkimpy's own PEM reader only finds LF-separated keys.
    crlf_key = DKIMKey(rsa_key.domain, rsa_key.selector, rsa_key.algorithm,
                       rsa_key.private_key.replace(b"\n", b"\r\n"))
    assert verify_all(sign_message(MESSAGE, [crlf_key]), rsa_key) == [True]
