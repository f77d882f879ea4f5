"""The Sender Rewriting Scheme (Mail::SRS "Guarded" forms, as postsrsd and Exim use them)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from mailsuite.smtp.srs import SRS, SRSError

SECRET = b"correct horse battery staple"
FORWARDER = "fwd.example.net"
DAY = 20_000  # days since the epoch: 2024-10-04
# A dot-atom local part @ a domain: what an SMTP server accepts without quoting.
ADDRESS_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]+$")


@pytest.fixture
def srs() -> SRS:
    return SRS(SECRET)


def test_forward_form_and_round_trip(srs: SRS) -> None:
    rewritten = srs.forward("alice@example.org", FORWARDER, today=DAY)
    assert re.fullmatch(r"SRS0=[A-Za-z0-9+/]{4}=[A-Z2-7]{2}=example\.org=alice@fwd\.example\.net",
                        rewritten)
    assert ADDRESS_RE.match(rewritten)
    assert srs.reverse(rewritten, today=DAY) == "alice@example.org"


def test_hash_and_timestamp_match_the_published_scheme(srs: SRS) -> None:
    rewritten = srs.forward("Alice@Example.org", FORWARDER, today=DAY)
    _, digest, stamp, host, local = rewritten.split("@")[0].split("=")
    # Day 20000 mod 1024 = 544 = 17 * 32 + 0 -> "R", "A".
    assert stamp == "RA"
    mac = hmac.new(SECRET, b"raexample.orgalice", hashlib.sha1).digest()
    assert digest == base64.b64encode(mac).decode()[:4]
    assert (host, local) == ("Example.org", "Alice")


def test_interoperates_with_postsrsd() -> None:
    # The vector of postsrsd's own unit test (tests/unit/test_srs2.c): secret "tops3cr3t",
    # clock at 2020-01-01 00:01 UTC.
    postsrsd = SRS(b"tops3cr3t")
    day = 1577836860 // 86400
    expected = "SRS0=vmyz=2W=otherdomain.com=test@example.com"
    assert postsrsd.forward("test@otherdomain.com", "example.com", today=day) == expected
    assert postsrsd.reverse(expected, today=day) == "test@otherdomain.com"


def test_reverse_is_case_insensitive(srs: SRS) -> None:
    rewritten = srs.forward("Alice@Example.org", FORWARDER, today=DAY)
    assert srs.reverse(rewritten.lower(), today=DAY) == "alice@example.org"
    assert srs.reverse(rewritten.upper(), today=DAY) == "ALICE@EXAMPLE.ORG"


def test_tampered_hash_refused(srs: SRS) -> None:
    rewritten = srs.forward("alice@example.org", FORWARDER, today=DAY)
    digest = rewritten.split("=")[1]
    forged = rewritten.replace(f"={digest}=", "=AAAA=" if digest != "AAAA" else "=BBBB=", 1)
    with pytest.raises(SRSError):
        srs.reverse(forged, today=DAY)
    with pytest.raises(SRSError):
        srs.reverse(rewritten.replace("=alice@", "=mallory@"), today=DAY)
    with pytest.raises(SRSError):
        SRS(b"another secret").reverse(rewritten, today=DAY)


def test_short_hash_refused(srs: SRS) -> None:
    rewritten = srs.forward("alice@example.org", FORWARDER, today=DAY)
    digest = rewritten.split("=")[1]
    with pytest.raises(SRSError):
        srs.reverse(rewritten.replace(f"={digest}=", f"={digest[:2]}=", 1), today=DAY)


def test_timestamp_age(srs: SRS) -> None:
    rewritten = srs.forward("alice@example.org", FORWARDER, today=DAY)
    assert srs.reverse(rewritten, today=DAY + 20) == "alice@example.org"
    # Mail::SRS counts the last day as valid: age == max_age is still accepted.
    assert srs.reverse(rewritten, today=DAY + 21) == "alice@example.org"
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(rewritten, today=DAY + 400)
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(rewritten, today=DAY + 22)
    # One full cycle of 1024 days later the stamp means "today" again: inherent to SRS.
    assert srs.reverse(rewritten, today=DAY + 1024) == "alice@example.org"


def test_timestamp_from_the_future_refused(srs: SRS) -> None:
    rewritten = srs.forward("alice@example.org", FORWARDER, today=DAY + 3)
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(rewritten, today=DAY)


def test_max_age_setting() -> None:
    short = SRS(SECRET, max_age_days=2)
    rewritten = short.forward("alice@example.org", FORWARDER, today=DAY)
    assert short.reverse(rewritten, today=DAY + 1) == "alice@example.org"
    with pytest.raises(SRSError):
        short.reverse(rewritten, today=DAY + 3)


def test_srs0_from_another_forwarder_becomes_srs1(srs: SRS) -> None:
    first = SRS(b"first forwarder's secret")
    srs0 = first.forward("alice@example.org", "first.example", today=DAY)
    srs1 = srs.forward(srs0, FORWARDER, today=DAY)
    srs0_local = srs0.split("@")[0]
    assert re.fullmatch(
        rf"SRS1=[A-Za-z0-9+/]{{4}}=first\.example=={re.escape(srs0_local[5:])}@fwd\.example\.net",
        srs1,
    )
    assert srs.reverse(srs1) == srs0
    assert first.reverse(srs.reverse(srs1), today=DAY) == "alice@example.org"


def test_srs1_hash_is_checked(srs: SRS) -> None:
    srs0 = SRS(b"other").forward("alice@example.org", "first.example", today=DAY)
    srs1 = srs.forward(srs0, FORWARDER)
    with pytest.raises(SRSError):
        srs.reverse(srs1.replace("=first.example=", "=evil.example="))


def test_srs0_separator_is_preserved(srs: SRS) -> None:
    srs0 = SRS(b"other").forward("alice@example.org", "first.example", today=DAY)
    plus_form = "SRS0+" + srs0[5:]
    srs1 = srs.forward(plus_form, FORWARDER)
    assert "=first.example=+" in srs1
    assert srs.reverse(srs1) == plus_form


def test_srs1_forwarded_again_keeps_the_first_host(srs: SRS) -> None:
    srs0 = SRS(b"one").forward("alice@example.org", "first.example", today=DAY)
    srs1 = SRS(b"two").forward(srs0, "second.example")
    third = srs.forward(srs1, FORWARDER)
    assert third.startswith("SRS1=") and "=first.example==" in third
    assert third.endswith("@" + FORWARDER)
    assert srs.reverse(third) == srs0


def test_null_sender_and_own_domain_unchanged(srs: SRS) -> None:
    assert srs.forward("", FORWARDER) == ""
    assert srs.forward("bob@FWD.example.net", FORWARDER) == "bob@FWD.example.net"


@pytest.mark.parametrize("sender", [
    "a=b@example.org",
    "user+tag@example.org",
    "x==y+z@example.org",
    "first.last@sub.example.co.uk",
])
def test_awkward_local_parts_round_trip(srs: SRS, sender: str) -> None:
    rewritten = srs.forward(sender, FORWARDER, today=DAY)
    assert ADDRESS_RE.match(rewritten)
    assert srs.reverse(rewritten, today=DAY) == sender


@pytest.mark.parametrize("address", [
    "alice@example.org",
    "SRS0@fwd.example.net",
    "SRS0=abcd=RA=example.org@fwd.example.net",
    "SRS1=abcd=host@fwd.example.net",
    "SRS0=abcd=R!=example.org=alice@fwd.example.net",
    "no-at-sign",
])
def test_malformed_addresses_refused(srs: SRS, address: str) -> None:
    with pytest.raises(SRSError):
        srs.reverse(address, today=DAY)


def test_is_srs() -> None:
    assert SRS.is_srs("SRS0=abcd=RA=example.org=alice")
    assert SRS.is_srs("srs0+abcd=RA=example.org=alice")
    assert SRS.is_srs("SRS1-abcd=host==abcd=RA=example.org=alice")
    assert not SRS.is_srs("SRS0")
    assert not SRS.is_srs("SRS2=abcd")
    assert not SRS.is_srs("srsuser")
    assert not SRS.is_srs("alice")
