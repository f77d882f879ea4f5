"""Modified UTF-7 mailbox names (RFC 3501 5.1.3)."""

from __future__ import annotations

import random

import pytest

from mailsuite.imap.utf7 import decode_mailbox, encode_mailbox


def test_rfc_3501_example_decodes_to_taipei_and_nihongo() -> None:
    assert decode_mailbox("~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"


def test_rfc_3501_example_encodes_back_to_its_wire_form() -> None:
    assert encode_mailbox("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"


def test_printable_us_ascii_represents_itself() -> None:
    name = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&")
    assert encode_mailbox(name) == name
    assert decode_mailbox(name) == name


def test_ampersand_is_represented_by_ampersand_hyphen() -> None:
    assert encode_mailbox("Tom & Jerry") == "Tom &- Jerry"
    assert decode_mailbox("Tom &- Jerry") == "Tom & Jerry"
    assert decode_mailbox("&-&-") == "&&"


def test_consecutive_non_ascii_characters_share_one_shift() -> None:
    assert encode_mailbox("台北") == "&U,BTFw-"
    assert encode_mailbox("é") == "&AOk-"


def test_control_characters_are_base64_encoded() -> None:
    assert encode_mailbox("a\tb") == "a&AAk-b"
    assert decode_mailbox("a&AAk-b") == "a\tb"


def test_characters_outside_the_bmp_use_surrogate_pairs() -> None:
    wire = encode_mailbox("mail 😀")
    assert wire == "mail &2D3eAA-"
    assert decode_mailbox(wire) == "mail 😀"


def test_every_string_without_surrogates_round_trips() -> None:
    rng = random.Random(3501)
    alphabet = ["&", "-", "/", "a", "Z", " ", "~", "\x00", "\x7f", "é", "台", "😀", "\uffff",
                "\U0010ffff", "+", ","]
    for _ in range(2000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        wire = encode_mailbox(name)
        assert wire.isascii()
        assert decode_mailbox(wire) == name
    for cp in list(range(0, 0xD800, 97)) + list(range(0xE000, 0x110000, 4099)):
        assert decode_mailbox(encode_mailbox(chr(cp) * 3)) == chr(cp) * 3


@pytest.mark.parametrize("wire", [
    "&U,BTFw",  # "&" not closed by "-"
    "abc&",  # a lone "&" at the end
    "&U,BTF!-",  # "!" is not modified BASE64
    "&U,BTF/w-",  # "/" is replaced by "," in modified BASE64
    "&U,BTFw=-",  # no "=" padding either
    "&AGE-",  # an encoded printable ASCII character ("a")
    "&ACY-",  # an encoded "&" (must be "&-")
    "&AGEAYgBj-",  # encoded "abc"
    "&A-",  # one BASE64 character: not even one UTF-16 unit
    "&AOkA-",  # superfluous trailing BASE64 character
    "&U,BTFx-",  # non-zero padding bits
    "&2D0-",  # a lone high surrogate
    "&3gA-",  # a lone low surrogate
    "&2D3eAA-&2D0-",  # a valid pair followed by a lone surrogate
    "caf\u00e9",  # raw non-ASCII in the wire form
    "tab\there",  # raw control character
    "del\x7f",
])
def test_malformed_modified_utf7_is_rejected(wire: str) -> None:
    with pytest.raises(ValueError):
        decode_mailbox(wire)


def test_a_surrogate_pair_split_over_two_shifts_is_rejected() -> None:
    with pytest.raises(ValueError):
        decode_mailbox("&2D0-&3gA-")


def test_lone_surrogates_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        encode_mailbox("\ud800")
