"""ENVELOPE, BODY, BODYSTRUCTURE and BODY[section] of stored messages (RFC 3501 6.4.5, 7.4.2),
computed from the raw bytes: exact sizes and line counts, defaults, quoting, nesting, and
malformed messages that must still give a well-formed answer."""

from __future__ import annotations

import email
import io
import re
from email import policy
from typing import Any

import pytest
from twisted.mail import imap4
from zope.interface import implementer

from mailsuite.structure import (
    body_structure,
    count_lines,
    envelope,
    imap_nstring,
    imap_string,
    section,
)


def crlf(text: str) -> bytes:
    """A message written with \\n line ends in the test, stored with CRLF as the store does."""
    return text.replace("\n", "\r\n").encode("utf-8")


def parse_imap(data: bytes) -> Any:
    """The one IMAP value in data (lists, quoted strings, literals, NIL, numbers) as Python
    values, failing on anything that is not exactly one well-formed value."""
    value, pos = _parse_value(data, 0)
    assert pos == len(data), f"trailing data at {pos}: {data[pos:pos + 40]!r}"
    return value


def _parse_value(data: bytes, pos: int) -> tuple[Any, int]:
    if data.startswith(b"(", pos):
        items: list[Any] = []
        pos += 1
        while not data.startswith(b")", pos):
            if items and data.startswith(b" ", pos):  # lists of lists may also go without
                pos += 1
            item, pos = _parse_value(data, pos)
            items.append(item)
        return items, pos + 1
    if data.startswith(b'"', pos):
        match = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"').match(data, pos)
        assert match, f"bad quoted string at {pos}: {data[pos:pos + 40]!r}"
        return re.sub(rb'\\(["\\])', rb"\1", match[1]), match.end()
    if data.startswith(b"{", pos):
        match = re.compile(rb"\{(\d+)\}\r\n").match(data, pos)
        assert match, f"bad literal at {pos}"
        end = match.end() + int(match[1])
        assert end <= len(data)
        return data[match.end():end], end
    match = re.compile(rb"NIL|\d+").match(data, pos)
    assert match, f"unexpected {data[pos:pos + 40]!r} at {pos}"
    return (None if match[0] == b"NIL" else int(match[0])), match.end()


# --- IMAP strings -------------------------------------------------------------------------------

def test_a_7bit_value_is_a_quoted_string_with_quotes_and_backslashes_escaped() -> None:
    assert imap_string(b'say "hi" \\ bye') == b'"say \\"hi\\" \\\\ bye"'
    assert imap_string("plain") == b'"plain"'
    assert imap_string(b"") == b'""'


def test_nil_stands_for_an_absent_value() -> None:
    assert imap_string(None) == b"NIL"
    assert imap_nstring(None) == b"NIL"
    assert imap_nstring(b"x") == b'"x"'


def test_8bit_values_and_line_breaks_become_literals() -> None:
    assert imap_string("Grüße") == b"{7}\r\nGr\xc3\xbc\xc3\x9fe"
    assert imap_string(b"a\r\nb") == b"{4}\r\na\r\nb"


def test_str_values_are_sent_as_utf8() -> None:
    assert imap_string("\u00e9") == b"{2}\r\n\xc3\xa9"
    assert imap_string("bad \ud800 surrogate") == b'"bad ? surrogate"'  # never raises


def test_nul_octets_are_dropped_because_no_imap4rev1_string_may_carry_them() -> None:
    assert imap_string(b"a\0b") == b'"ab"'


def test_lines_are_counted_by_line_ends() -> None:
    assert count_lines(b"") == 0
    assert count_lines(b"one\r\ntwo\r\n") == 2
    assert count_lines(b"one\r\ntwo") == 1
    assert count_lines(b"bare\nlf\n") == 2


# --- single-part bodies -------------------------------------------------------------------------

# 91 lines of 33 octets and one of 25: RFC 3501's example body of 3028 octets in 92 lines.
RFC3501_BODY = b"".join(b"line %02d of the example body....\r\n" % i for i in range(91)) + (
    b"the last, shorter line.\r\n")


def test_rfc3501_example_body_structure_text_plain_of_3028_octets_and_92_lines() -> None:
    assert len(RFC3501_BODY) == 3028 and RFC3501_BODY.count(b"\n") == 92
    raw = b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\n" + RFC3501_BODY
    assert body_structure(raw, extensible=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)')


def test_missing_content_type_defaults_to_text_plain_us_ascii_7bit() -> None:
    raw = b"Subject: no MIME at all\r\n\r\n" + RFC3501_BODY
    assert body_structure(raw, extensible=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)')
    assert body_structure(raw) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92 NIL NIL NIL NIL)')


def test_simple_text_plain_reports_the_body_size_in_octets_and_its_lines() -> None:
    raw = crlf("From: a@example.com\nContent-Type: text/plain; charset=us-ascii\n\n"
               "Hello\nWorld\n")
    assert body_structure(raw) == (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7BIT" 14 2 NIL NIL NIL NIL)')


def test_quoted_printable_with_charset_param_keeps_the_encoding_and_parameters_as_given() -> None:
    raw = crlf('Content-Type: text/plain; charset="ISO-8859-1"; format=flowed\n'
               "Content-Transfer-Encoding: quoted-printable\n"
               "Content-ID: <part1@example.com>\nContent-Description: a note\n"
               "Content-Language: en, de\nContent-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\n"
               "Content-Location: http://example.com/note.txt\n\n"
               "caf=E9\n")
    assert body_structure(raw) == (
        b'("text" "plain" ("charset" "ISO-8859-1" "format" "flowed") "<part1@example.com>" '
        b'"a note" "quoted-printable" 8 1 "Q2hlY2sgSW50ZWdyaXR5IQ==" NIL ("en" "de") '
        b'"http://example.com/note.txt")')


def test_text_without_a_charset_parameter_is_given_us_ascii() -> None:
    raw = crlf("Content-Type: text/html\n\n<p>x</p>\n")
    assert body_structure(raw, extensible=False) == (
        b'("text" "html" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 10 1)')


def test_non_text_single_part_has_no_line_count_and_nil_parameters_when_none() -> None:
    raw = crlf("Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
               "AAECAw==\n")
    assert body_structure(raw, extensible=False) == (
        b'("application" "octet-stream" NIL NIL NIL "base64" 10)')


def test_rfc2231_continuations_are_joined_and_encoded_values_stay_encoded() -> None:
    raw = crlf("Content-Type: application/pdf;\n name*0=\"long-\";\n name*1=\"name.pdf\"\n"
               "Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.pdf\n\nx\n")
    assert body_structure(raw) == (
        b'("application" "pdf" ("name" "long-name.pdf") NIL NIL "7BIT" 3 NIL '
        b"(\"attachment\" (\"filename*\" \"utf-8''%E2%82%AC.pdf\")) NIL NIL)")


def test_a_content_type_without_a_subtype_is_ignored_for_the_default() -> None:
    raw = crlf("Content-Type: text\n\nx\n")
    assert body_structure(raw, extensible=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3 1)')


def test_a_forgotten_semicolon_still_gives_the_type_and_the_disposition() -> None:
    raw = crlf("Content-Type: image/gif name=x.gif\nContent-Disposition: inline filename=x.gif\n"
               "\nGIF89a\n")
    assert body_structure(raw) == (
        b'("image" "gif" NIL NIL NIL "7BIT" 8 NIL ("inline" NIL) NIL NIL)')


def test_comments_in_mime_fields_are_left_out() -> None:
    raw = crlf('Content-Type: text/plain (the usual); charset="utf-8" (yes)\n'
               "Content-Transfer-Encoding: 8bit (really)\n\nx\n")
    assert body_structure(raw, extensible=False) == (
        b'("text" "plain" ("charset" "utf-8") NIL NIL "8bit" 3 1)')


# --- multiparts ---------------------------------------------------------------------------------

ALTERNATIVE = crlf(
    "From: Alice <alice@example.com>\n"
    "Subject: alternatives\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/alternative; boundary="alt"\n'
    "\n"
    "This is a MIME message.\n"
    "--alt\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "Content-Transfer-Encoding: 7bit\n"
    "\n"
    "hello\n"
    "\n"
    "--alt\n"
    "Content-Type: text/html; charset=us-ascii\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "<p>hello</p>\n"
    "\n"
    "--alt--\n"
    "epilogue\n")


def test_multipart_alternative_bodystructure_lists_both_parts_then_the_subtype() -> None:
    assert body_structure(ALTERNATIVE) == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 7 1 NIL NIL NIL NIL)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "quoted-printable" 14 1 NIL NIL NIL NIL)'
        b' "alternative" ("boundary" "alt") NIL NIL NIL)')
    assert body_structure(ALTERNATIVE, extensible=False) == (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 7 1)'
        b'("text" "html" ("charset" "us-ascii") NIL NIL "quoted-printable" 14 1) "alternative")')


MIXED = crlf(
    "From: Alice <alice@example.com>\n"
    "To: bob@example.org\n"
    "Subject: report\n"
    "Date: Tue, 2 Jan 2024 10:00:00 +0100\n"
    "Content-Type: multipart/mixed; boundary=outer\n"
    "\n"
    "--outer\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    "See the attachment.\n"
    "--outer\n"
    'Content-Type: application/pdf; name="report.pdf"\n'
    'Content-Disposition: attachment; filename="report.pdf"; size=6\n'
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "JVBERi0=\n"
    "--outer--\n")


def test_multipart_mixed_attachment_has_its_disposition_with_the_filename_parameter() -> None:
    assert body_structure(MIXED) == (
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "7BIT" 19 0 NIL NIL NIL NIL)'
        b'("application" "pdf" ("name" "report.pdf") NIL NIL "base64" 8 NIL'
        b' ("attachment" ("filename" "report.pdf" "size" "6")) NIL NIL)'
        b' "mixed" ("boundary" "outer") NIL NIL NIL)')


def test_the_crlf_before_a_boundary_belongs_to_the_boundary_not_to_the_part() -> None:
    assert section(MIXED, (1,), "") == b"See the attachment."
    assert section(MIXED, (2,), "") == b"JVBERi0="


NESTED = crlf(
    "From: Carol <carol@example.net>\n"
    "Subject: nested\n"
    "Content-Type: multipart/mixed; boundary=\"=_outer\"\n"
    "\n"
    "--=_outer\n"
    "Content-Type: multipart/alternative; boundary=\"=_outer_inner\"\n"
    "\n"
    "--=_outer_inner\n"
    "Content-Type: text/plain\n"
    "\n"
    "plain\n"
    "\n"
    "--=_outer_inner\n"
    "Content-Type: text/html\n"
    "\n"
    "<b>html</b>\n"
    "\n"
    "--=_outer_inner--\n"
    "\n"
    "--=_outer\n"
    "Content-Type: image/png\n"
    "Content-Disposition: inline\n"
    "Content-ID: <img1>\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "iVBORw0KGgo=\n"
    "--=_outer--\n")


def test_nested_multipart_is_written_inside_its_parent_even_when_boundaries_share_a_prefix(
) -> None:
    assert body_structure(NESTED, extensible=False) == (
        b'((("text" "plain" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 7 1)'
        b'("text" "html" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 13 1) "alternative")'
        b'("image" "png" NIL "<img1>" NIL "base64" 12) "mixed")')
    assert body_structure(NESTED).endswith(
        b'("image" "png" NIL "<img1>" NIL "base64" 12 NIL ("inline" NIL) NIL NIL)'
        b' "mixed" ("boundary" "=_outer") NIL NIL NIL)')


def test_multipart_digest_parts_default_to_message_rfc822() -> None:
    raw = crlf("Content-Type: multipart/digest; boundary=d\n\n"
               "--d\n\nFrom: x@example.com\nSubject: one\n\nfirst\n"
               "--d--\n")
    assert body_structure(raw, extensible=False) == (
        b'(("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 42 (NIL "one" ((NIL NIL "x" "example.com"))'
        b' ((NIL NIL "x" "example.com")) ((NIL NIL "x" "example.com")) NIL NIL NIL NIL NIL)'
        b' ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 5 0) 3) "digest")')


def test_a_multipart_without_parts_is_given_one_empty_text_plain_part() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=nothere\n\njust text\n")
    assert body_structure(raw, extensible=False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0) "mixed")')
    no_boundary = crlf("Content-Type: multipart/mixed\n\njust text\n")
    assert body_structure(no_boundary, extensible=False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0) "mixed")')


# --- message/rfc822 -----------------------------------------------------------------------------

FORWARD = crlf(
    "From: Dave <dave@example.com>\n"
    "To: erin@example.com\n"
    "Subject: Fwd: lunch\n"
    "Content-Type: multipart/mixed; boundary=fw\n"
    "\n"
    "--fw\n"
    "Content-Type: text/plain\n"
    "\n"
    "Forwarding.\n"
    "\n"
    "--fw\n"
    "Content-Type: message/rfc822\n"
    "Content-Disposition: attachment\n"
    "\n"
    "From: Frank <frank@example.org>\n"
    "To: dave@example.com\n"
    "Subject: lunch\n"
    "Date: Wed, 3 Jan 2024 12:00:00 +0000\n"
    "Message-ID: <lunch@example.org>\n"
    "Content-Type: multipart/alternative; boundary=in\n"
    "\n"
    "--in\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    "Noon?\n"
    "\n"
    "--in\n"
    "Content-Type: text/html; charset=utf-8\n"
    "\n"
    "<p>Noon?</p>\n"
    "\n"
    "--in--\n"
    "\n"
    "--fw--\n")

FORWARDED = FORWARD[FORWARD.index(b"From: Frank"):FORWARD.index(b"\r\n--fw--")]


def test_message_rfc822_part_gives_the_envelope_the_inner_structure_and_its_lines() -> None:
    inner_envelope = (
        b'("Wed, 3 Jan 2024 12:00:00 +0000" "lunch" (("Frank" NIL "frank" "example.org"))'
        b' (("Frank" NIL "frank" "example.org")) (("Frank" NIL "frank" "example.org"))'
        b' ((NIL NIL "dave" "example.com")) NIL NIL NIL "<lunch@example.org>")')
    assert body_structure(FORWARD, extensible=False) == (
        b'(("text" "plain" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 13 1)'
        b'("message" "rfc822" NIL NIL NIL "7BIT" %d ' % len(FORWARDED)
        + inner_envelope
        + b' (("text" "plain" ("charset" "utf-8") NIL NIL "7BIT" 7 1)'
        b'("text" "html" ("charset" "utf-8") NIL NIL "7BIT" 14 1) "alternative")'
        b" %d) \"mixed\")" % FORWARDED.count(b"\n"))
    assert envelope(FORWARDED) == inner_envelope


def test_message_rfc822_extension_data_follows_its_line_count() -> None:
    structure = parse_imap(body_structure(FORWARD))
    attached = structure[1]
    assert attached[:2] == [b"message", b"rfc822"]
    assert attached[9] == FORWARDED.count(b"\n")
    assert attached[10:] == [None, [b"attachment", None], None, None]
    assert attached[8][-5:] == [b"alternative", [b"boundary", b"in"], None, None, None]


# --- ENVELOPE -----------------------------------------------------------------------------------

def test_envelope_lists_groups_and_multiple_addresses_per_rfc3501() -> None:
    raw = crlf('From: "Doe, John" <john@example.com>, jane@example.com (Jane Roe)\n'
               "To: Team: ann@example.com, Bob <bob@example.com>;, carl@example.com\n"
               "Cc: undisclosed-recipients:;\n"
               "Subject: hello\n"
               "\tworld\n"
               "In-Reply-To: <prev@example.com>\n"
               "Message-ID: <this@example.com>\n\nbody\n")
    assert envelope(raw) == (
        b'(NIL "hello\tworld"'
        b' (("Doe, John" NIL "john" "example.com")("Jane Roe" NIL "jane" "example.com"))'
        b' (("Doe, John" NIL "john" "example.com")("Jane Roe" NIL "jane" "example.com"))'
        b' (("Doe, John" NIL "john" "example.com")("Jane Roe" NIL "jane" "example.com"))'
        b' ((NIL NIL "Team" NIL)(NIL NIL "ann" "example.com")("Bob" NIL "bob" "example.com")'
        b'(NIL NIL NIL NIL)(NIL NIL "carl" "example.com"))'
        b' ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'
        b' NIL "<prev@example.com>" "<this@example.com>")')


def test_sender_and_reply_to_are_their_own_when_present_and_from_when_empty() -> None:
    raw = crlf("From: a@example.com\nSender: s@example.com\nReply-To:\n\n")
    assert envelope(raw) == (
        b'(NIL NIL ((NIL NIL "a" "example.com")) ((NIL NIL "s" "example.com"))'
        b' ((NIL NIL "a" "example.com")) NIL NIL NIL NIL NIL)')


def test_missing_from_gives_nil_for_from_sender_and_reply_to() -> None:
    raw = crlf("To: x@example.com\nSubject: anonymous\n\nbody\n")
    assert envelope(raw) == (
        b'(NIL "anonymous" NIL NIL NIL ((NIL NIL "x" "example.com")) NIL NIL NIL NIL)')


def test_a_message_without_any_header_has_an_all_nil_envelope() -> None:
    assert envelope(b"") == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    assert envelope(b"\r\njust a body\r\n") == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_8bit_utf8_subject_becomes_a_literal() -> None:
    raw = "Subject: Grüße aus Köln\r\nFrom: Jürgen <j@example.de>\r\n\r\n".encode()
    subject = "Grüße aus Köln".encode()
    name = "Jürgen".encode()
    assert envelope(raw) == (
        b"(NIL {%d}\r\n%s ((" % (len(subject), subject)
        + b"{%d}\r\n%s NIL \"j\" \"example.de\"))" % (len(name), name)
        + b" ((" + b"{%d}\r\n%s NIL \"j\" \"example.de\"))" % (len(name), name)
        + b" ((" + b"{%d}\r\n%s NIL \"j\" \"example.de\"))" % (len(name), name)
        + b" NIL NIL NIL NIL NIL)")


def test_encoded_words_are_given_raw_for_the_client_to_decode() -> None:
    raw = crlf("Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\n"
               "From: =?UTF-8?Q?J=C3=BCrgen?= =?UTF-8?Q?_M?= <j@example.de>\n\n")
    structure = parse_imap(envelope(raw))
    assert structure[1] == b"=?UTF-8?Q?Gr=C3=BC=C3=9Fe?="
    assert structure[2] == [[b"=?UTF-8?Q?J=C3=BCrgen?= =?UTF-8?Q?_M?=", None, b"j", b"example.de"]]


def test_quotes_and_backslashes_in_header_values_are_escaped() -> None:
    raw = crlf('Subject: a "quoted" \\ word\nFrom: "Smith \\"Smitty\\" J." <s@example.com>\n\n')
    assert envelope(raw) == (
        b'(NIL "a \\"quoted\\" \\\\ word" (("Smith \\"Smitty\\" J." NIL "s" "example.com"))'
        b' (("Smith \\"Smitty\\" J." NIL "s" "example.com"))'
        b' (("Smith \\"Smitty\\" J." NIL "s" "example.com")) NIL NIL NIL NIL NIL)')


def test_broken_addresses_get_placeholders_never_a_nil_host() -> None:
    raw = crlf("From: John Smith\nTo: <>, @example.com, ,, \n"
               "Cc: <@relay.example:x@example.com>\n\n")
    structure = parse_imap(envelope(raw))
    assert structure[2] == [[None, None, b"John", b"MISSING_DOMAIN"]]
    assert structure[5] == [[None, None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"],
                            [None, None, b"MISSING_MAILBOX", b"example.com"]]
    assert structure[6] == [[None, b"@relay.example", b"x", b"example.com"]]


def test_obs_phrase_and_domain_literal_addresses() -> None:
    raw = crlf("From: John Q. Public <jqp@[192.0.2.1]>\n\n")
    assert parse_imap(envelope(raw))[2] == [[b"John Q. Public", None, b"jqp", b"[192.0.2.1]"]]


# --- sections -----------------------------------------------------------------------------------

def test_header_section_is_the_header_with_its_blank_line_and_text_the_rest() -> None:
    header, _, text = MIXED.partition(b"\r\n\r\n")
    assert section(MIXED, (), "HEADER") == header + b"\r\n\r\n"
    assert section(MIXED, (), "TEXT") == text
    assert section(MIXED, (), "") == MIXED


def test_header_fields_returns_the_named_fields_in_message_order_and_a_blank_line() -> None:
    raw = crlf("Received: from x\n  by y\nFrom: a@example.com\nSubject: s\n"
               "Date: Mon, 1 Jan 2024 00:00:00 +0000\nfrom: second@example.com\n\nbody\n")
    assert section(raw, (), "HEADER.FIELDS", ("DATE", "FROM")) == crlf(
        "From: a@example.com\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nfrom: second@example.com\n\n")
    assert section(raw, (), "HEADER.FIELDS.NOT", ("DATE", "FROM")) == crlf(
        "Received: from x\n  by y\nSubject: s\n\n")
    assert section(raw, (), "HEADER.FIELDS", ("X-Absent",)) == b"\r\n"


def test_part_1_and_its_mime_header() -> None:
    assert section(ALTERNATIVE, (1,), "") == b"hello\r\n"
    assert section(ALTERNATIVE, (1,), "MIME") == crlf(
        "Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n\n")
    assert section(ALTERNATIVE, (2,), "") == b"<p>hello</p>\r\n"


def test_part_1_of_a_non_multipart_message_is_its_body() -> None:
    raw = crlf("Subject: plain\n\nline one\nline two\n")
    assert section(raw, (1,), "") == b"line one\r\nline two\r\n"
    assert section(raw, (2,), "") == b""
    assert section(raw, (1, 1), "") == b""


def test_a_part_that_does_not_exist_is_empty() -> None:
    assert section(ALTERNATIVE, (3,), "") == b""
    assert section(ALTERNATIVE, (0,), "") == b""
    assert section(ALTERNATIVE, (1, 2), "") == b""
    assert section(ALTERNATIVE, (3,), "MIME") == b""
    assert section(ALTERNATIVE, (1,), "HEADER") == b""  # not a message/rfc822 part


def test_nested_parts_are_numbered_through_multiparts_and_encapsulated_messages() -> None:
    assert section(NESTED, (1,), "MIME") == crlf(
        'Content-Type: multipart/alternative; boundary="=_outer_inner"\n\n')
    assert section(NESTED, (1, 2), "") == b"<b>html</b>\r\n"
    assert section(NESTED, (2,), "") == b"iVBORw0KGgo="
    # FORWARD: 2 is message/rfc822, 2.1 and 2.2 the parts of the message it encapsulates.
    assert section(FORWARD, (2,), "") == FORWARDED
    assert section(FORWARD, (2,), "HEADER") == FORWARDED[:FORWARDED.index(b"\r\n\r\n") + 4]
    assert section(FORWARD, (2,), "TEXT") == FORWARDED[FORWARDED.index(b"\r\n\r\n") + 4:]
    assert section(FORWARD, (2,), "HEADER.FIELDS", ("subject",)) == b"Subject: lunch\r\n\r\n"
    assert section(FORWARD, (2, 1), "") == b"Noon?\r\n"
    assert section(FORWARD, (2, 2), "MIME") == b"Content-Type: text/html; charset=utf-8\r\n\r\n"


def test_text_of_a_message_rfc822_part_inside_a_nested_multipart() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=a\n\n"
               "--a\n\nfirst\n"
               "--a\nContent-Type: multipart/mixed; boundary=b\n\n"
               "--b\nContent-Type: message/rfc822\n\n"
               "Subject: deep\n\ndeep body\n"
               "--b--\n"
               "--a--\n")
    assert section(raw, (2, 1), "HEADER") == b"Subject: deep\r\n\r\n"
    assert section(raw, (2, 1, 1), "") == b"deep body"  # its body: part 1 of a non-multipart
    assert section(raw, (2, 1), "TEXT") == b"deep body"


def test_section_text_names_are_case_insensitive_and_unknown_ones_are_refused() -> None:
    assert section(MIXED, (), "header") == section(MIXED, (), "HEADER")
    with pytest.raises(ValueError):
        section(MIXED, (), "BODY")


def test_mime_of_the_whole_message_does_not_exist() -> None:
    assert section(MIXED, (), "MIME") == b""


# --- malformed messages -------------------------------------------------------------------------

def test_malformed_multipart_with_a_missing_final_boundary_does_not_raise() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=x\n\n"
               "--x\nContent-Type: text/plain\n\nfirst\n"
               "--x\nContent-Type: text/plain\n\nsecond, never closed\n")
    assert body_structure(raw, extensible=False) == (
        b'(("text" "plain" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 5 0)'
        b'("text" "plain" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 22 1) "mixed")')
    assert section(raw, (2,), "") == b"second, never closed\r\n"


def test_an_outer_boundary_ends_an_inner_multipart_that_never_closed() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=out\n\n"
               "--out\nContent-Type: multipart/alternative; boundary=in\n\n"
               "--in\n\ninner one\n"
               "--out\nContent-Type: text/plain\n\nouter two\n"
               "--out--\n")
    assert body_structure(raw, extensible=False) == (
        b'((("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 9 0) "alternative")'
        b'("text" "plain" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 9 0) "mixed")')
    assert section(raw, (2,), "") == b"outer two"


def test_bare_lf_line_ends_are_accepted() -> None:
    raw = (b"Subject: lf\nContent-Type: multipart/mixed; boundary=z\n\n"
           b"--z\nContent-Type: text/plain\n\none\ntwo\n--z--\n")
    assert body_structure(raw, extensible=False) == (
        b'(("text" "plain" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 7 1) "mixed")')
    assert section(raw, (), "HEADER.FIELDS", ("subject",)) == b"Subject: lf\n\r\n"
    assert section(raw, (1,), "") == b"one\ntwo"


def test_a_message_without_a_blank_line_is_all_header() -> None:
    raw = b"Subject: only a header\r\n"
    assert section(raw, (), "HEADER") == raw
    assert section(raw, (), "TEXT") == b""
    assert body_structure(raw, extensible=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)')


def test_deep_nesting_is_cut_off_instead_of_recursing_without_bound() -> None:
    raw = b"".join(b"Content-Type: message/rfc822\r\n\r\n" for _ in range(500)) + b"x\r\n"
    structure = body_structure(raw)
    assert structure.count(b'"APPLICATION" "OCTET-STREAM"') == 1
    parse_imap(structure)


def test_every_truncation_of_a_complex_message_gives_well_formed_answers() -> None:
    for end in range(len(FORWARD) + 1):
        raw = FORWARD[:end]
        parse_imap(body_structure(raw))
        parse_imap(body_structure(raw, extensible=False))
        parse_imap(envelope(raw))
        for part in ((), (1,), (2,), (2, 1), (2, 2), (3,)):
            for what in ("", "HEADER", "TEXT", "MIME", "HEADER.FIELDS"):
                section(raw, part, what, ("From",))


def test_garbage_never_raises_and_gives_a_well_formed_answer() -> None:
    samples = [
        b"", b"\r\n", b"\n\n\n", b"--", b"From: \r\n\r\n", b"From: <\r\n\r\n",
        b'From: "unterminated\r\nTo: (nested (comment\r\n\r\n',
        b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
        b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\n--\r\n',
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n--a\r\n--a--",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a--\r\n",
        b"Content-Type: message/rfc822\r\n\r\n",
        b"Content-Type: ;;;=;=x; x=\"\r\nContent-Disposition: ;\r\n\r\n",
        b"Content-Type: text/plain; a*0*=x; a*2=y; a*1=z\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\nContent-Type: text/x\r\n--a--",
        b"\x00\xff\xfe: \x00\r\nSubject: \x00\x01\r\n\r\n\x00",
        b"To: a:b:c;d;;,<<>>@@..[[\r\nFrom: ,,,\r\nCc: ::\r\n\r\n",
    ]
    for raw in samples:
        parse_imap(body_structure(raw))
        parse_imap(body_structure(raw, extensible=False))
        parse_imap(envelope(raw))
        for what in ("", "HEADER", "TEXT", "MIME", "HEADER.FIELDS.NOT"):
            section(raw, (1,), what, ("x",))
            section(raw, (), what if what != "MIME" else "", ("x",))


def test_a_part_whose_header_runs_into_a_boundary_has_an_empty_body() -> None:
    raw = crlf("Content-Type: multipart/mixed; boundary=a\n\n"
               "--a\nContent-Type: text/plain\n--a\n\nsecond\n--a--\n")
    assert section(raw, (1,), "MIME") == b"Content-Type: text/plain"
    assert section(raw, (1,), "") == b""
    assert section(raw, (2,), "") == b"second"


def test_sizes_in_the_structure_are_the_lengths_of_the_part_sections() -> None:
    structure = parse_imap(body_structure(NESTED, extensible=False))
    assert structure[0][0][6] == len(section(NESTED, (1, 1), ""))
    assert structure[0][1][6] == len(section(NESTED, (1, 2), ""))
    assert structure[1][6] == len(section(NESTED, (2,), ""))


# --- cross-check with Twisted's implementation --------------------------------------------------

@implementer(imap4.IMessagePart)
class _EmailPart:
    """Twisted's IMessagePart over an email-package message, for Twisted's getBodyStructure."""

    def __init__(self, message: email.message.Message) -> None:
        self.message = message

    def getHeaders(self, negate: bool, *names: str) -> dict[str, str]:
        wanted = {name.lower() for name in names}
        return {key.lower(): value for key, value in self.message.items()
                if (key.lower() in wanted) != negate}

    def _body(self) -> bytes:
        payload = self.message.get_payload()
        return payload.encode("ascii", "surrogateescape") if isinstance(payload, str) else b""

    def getBodyFile(self) -> io.BytesIO:
        return io.BytesIO(self._body())

    def getSize(self) -> int:
        return len(self._body())

    def isMultipart(self) -> bool:
        return self.message.is_multipart()

    def getSubPart(self, part: int) -> _EmailPart:
        return _EmailPart(self.message.get_payload(part))


def _twisted_body(raw: bytes) -> bytes:
    message = email.message_from_bytes(raw, policy=policy.compat32)
    collapsed = imap4.collapseNestedLists([imap4.getBodyStructure(_EmailPart(message), False)])
    # Twisted puts a space between the parts of a multipart; RFC 3501's body-type-mpart
    # (1*body SP media-subtype) has none.
    return collapsed.replace(b") (", b")(")


@pytest.mark.parametrize("raw", [
    crlf("Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n\n"
         "one\ntwo\nthree\n"),
    ALTERNATIVE,
], ids=["text-plain", "multipart-alternative"])
def test_body_agrees_with_twisteds_getbodystructure(raw: bytes) -> None:
    assert body_structure(raw, extensible=False) == _twisted_body(raw)
