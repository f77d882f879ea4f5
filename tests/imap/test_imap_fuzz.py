"""Fuzz targets for the IMAP command parser, the SEARCH key parser and evaluator, and the
modified UTF-7 mailbox name codec: on any input they return a result or raise the parse error
they define (ParseError, ValueError for names), never anything else, and adversarial nesting
costs bounded time.

Each target runs a bounded number of examples (a few seconds in all) so that it can run in CI
with the rest of the suite.
"""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsuite.imap import parser as p
from mailsuite.imap.search import (
    MAX_SEARCH_KEYS,
    SearchContext,
    SearchMessage,
    TooComplex,
    matches,
    parse_search,
)
from mailsuite.imap.utf7 import decode_mailbox, encode_mailbox

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Pieces of IMAP syntax, so that generated lines get past the tag into the interesting parts.
WORDS = ["a", "A1", "UID", "FETCH", "SEARCH", "STORE", "APPEND", "LOGIN", "SELECT", "LIST",
         "1:*", "*", "1,3:5", "4294967296", "0", "BODY[", "BODY.PEEK[HEADER.FIELDS (FROM)]",
         "BODY[1.2.MIME]<0.10>", "BINARY[1]", "]", "[", "(", ")", '"', '"q\\"s"', "{3}", "{5+}",
         "~{2}", "NIL", "\\Seen", "$Junk", "OR", "NOT", "ALL", "TEXT", "HEADER", "SUBJECT",
         "CHARSET", "UTF-8", "BEFORE", "1-Feb-1994", '"17-Jul-1996 02:44:25 -0700"', "%",
         "INBOX", "&AMk-", "&-", " ", "  ", "\t", "\x00", "\xff", "<0.5>", "LARGER", "KEYWORD"]

line_text = st.lists(st.sampled_from(WORDS), max_size=30).map("".join)


def to_bytes(text: str) -> bytes:
    return text.encode("latin-1", "replace")


@st.composite
def commands(draw: st.DrawFn) -> list[bytes]:
    """A command as the server hands it to the parser: lines and literal payloads
    alternating, ending with a line, each line ending in {n} before a literal of n octets."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 3))):
        payload = draw(st.binary(max_size=20))
        marker = draw(st.sampled_from(["{%d}", "{%d+}", "~{%d}"])) % len(payload)
        parts.append(to_bytes(draw(line_text)) + marker.encode())
        parts.append(payload)
    parts.append(to_bytes(draw(line_text)))
    if draw(st.booleans()):
        parts[0] = b"t " + parts[0]
    return parts


@FUZZ
@given(commands())
def test_parse_command_returns_a_command_or_raises_parse_error(parts: list[bytes]) -> None:
    try:
        command = p.parse_command(parts)
    except p.ParseError:
        return
    assert command.tag and command.name == command.name.upper()


@FUZZ
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=5))
def test_parse_command_on_raw_octets_raises_nothing_but_parse_error(parts: list[bytes]) -> None:
    if len(parts) % 2 == 0:
        parts = parts[:-1]
    with contextlib.suppress(p.ParseError):
        p.parse_command(parts)


@FUZZ
@given(st.binary(max_size=40))
def test_literal_at_end_gives_a_size_none_or_parse_error(line: bytes) -> None:
    try:
        result = p.literal_at_end(line)
    except p.ParseError:
        return
    assert result is None or (0 <= result[0] <= p.MAX_NUMBER and isinstance(result[1], bool))


MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
           b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nDate: 1 Feb 1994 00:30:00 +1300\r\n"
           b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
           b"Content-Type: text/plain; charset=punycode\r\n\r\nab\r\n--x\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
           b"\r\nR3LDvMOfZQ=\r\n--x--\r\n")


def search_message(raw: bytes) -> SearchMessage:
    return SearchMessage(seq=1, uid=7, flags={"\\Seen"}, internal_date=datetime.now(UTC),
                         size=len(raw), recent=False, raw=lambda: raw)


@FUZZ
@given(commands(), st.binary(max_size=300))
def test_search_programs_parse_to_keys_or_parse_errors_and_evaluate_on_any_message(
        parts: list[bytes], body: bytes) -> None:
    parts = [b"t SEARCH " + parts[0], *parts[1:]]
    try:
        key = parse_search(p.parse_command(parts).args)
    except p.ParseError:
        return
    for raw in (MESSAGE, body, MESSAGE + body):
        assert matches(key, search_message(raw), SearchContext(max_seq=3, max_uid=9)) in (
            True, False)


@FUZZ
@given(st.text(max_size=30))
def test_mailbox_names_round_trip_and_decoding_raises_only_value_error(name: str) -> None:
    try:
        wire = encode_mailbox(name)
    except UnicodeEncodeError:  # lone surrogates have no UTF-16 form
        return
    assert decode_mailbox(wire) == name
    assert wire.isascii()


@FUZZ
@given(st.text(alphabet=st.sampled_from("&-AMkyQ,+/abc. \x7f\u00e9"), max_size=30))
def test_decoding_any_wire_string_gives_its_one_name_or_value_error(wire: str) -> None:
    try:
        name = decode_mailbox(wire)
    except ValueError:
        return
    assert encode_mailbox(name) == wire  # only the canonical form is accepted


# --------------------------------------------------------------------------- adversarial sizes
@pytest.mark.parametrize("line", [
    b"t SEARCH " + b"(" * 100_000,
    b"t SEARCH " + b"NOT " * 60_000 + b"ALL",
    b"t SEARCH " + b"OR ALL " * 9_000 + b"ALL",
    b"t FETCH 1 (" + b"BODY[HEADER.FIELDS (" * 5000,
    b"t LIST " + b'"' + b"\\\\" * 30_000 + b'"' + b" *",
    b"t STORE 1:2,3:4," * 4000 + b" FLAGS (\\Seen)",
])
def test_adversarial_commands_are_parsed_or_refused_in_bounded_time(line: bytes) -> None:
    started = time.process_time()
    try:
        command = p.parse_command([line])
        if command.name == "SEARCH":
            parse_search(command.args)
    except TooComplex:
        pass
    except p.ParseError:
        pass
    assert time.process_time() - started < 2.0


def test_a_search_program_at_the_key_limit_evaluates_in_bounded_time() -> None:
    line = b"t SEARCH " + b"NOT OR SEEN " * ((MAX_SEARCH_KEYS - 1) // 3) + b"ALL"
    key = parse_search(p.parse_command([line]).args)
    started = time.process_time()
    for _ in range(100):
        matches(key, search_message(MESSAGE), SearchContext(max_seq=3, max_uid=9))
    assert time.process_time() - started < 2.0


@FUZZ
@given(st.lists(st.sampled_from(["=?", "?=", "?q?", "?B?", "utf-8", "punycode", "idna",
                                 "iso-8859-1*en", "=C3", "=A9", "_", "QUJD", "=", " ", "\t",
                                 "\r\n ", "x", "\u00e9", "\udcff"]), max_size=40).map("".join))
def test_header_values_with_any_encoded_words_are_searched(value: str) -> None:
    raw = b"Subject: " + value.encode("utf-8", "surrogateescape") + b"\r\n\r\nbody\r\n"
    key = parse_search(p.parse_command([b"t SEARCH OR SUBJECT x TEXT y"]).args)
    assert matches(key, search_message(raw), SearchContext(max_seq=3, max_uid=9)) in (
        True, False)


def test_many_encoded_words_are_decoded_in_linear_time() -> None:
    key = parse_search(p.parse_command([b"t SEARCH SUBJECT zzz"]).args)
    timings = []
    for count in (20_000, 80_000):
        raw = b"Subject: " + b"=?utf-8?q?ab=C3=A9?= =?punycode?b?YWI=?= " * count + b"\r\n\r\n"
        started = time.process_time()
        assert not matches(key, search_message(raw), SearchContext(max_seq=3, max_uid=9))
        timings.append(time.process_time() - started)
    # Four times the words may cost up to about four times as much, not sixteen.
    assert timings[1] < 2.0 and timings[1] < 8 * timings[0] + 0.2, timings
