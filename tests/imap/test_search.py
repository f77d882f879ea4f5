"""SEARCH and UID SEARCH keys (RFC 3501 6.4.4) and their evaluation."""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone

import pytest

from mailsuite.imap.parser import ParseError, SequenceSet, parse_command
from mailsuite.imap.search import (
    MAX_SEARCH_KEYS,
    All,
    And,
    BadCharset,
    Body,
    Flag,
    Header,
    InternalDate,
    Not,
    Or,
    Recent,
    SearchContext,
    SearchKey,
    SearchMessage,
    SentDate,
    SeqSet,
    Size,
    Text,
    TooComplex,
    UidSet,
    matches,
    needs_raw,
    parse_search,
)

EST = timezone(-timedelta(hours=5))

# A multipart message: an RFC 2047 subject, a quoted-printable UTF-8 text part, a base64
# Latin-1 text part and a base64 attachment whose decoded text must not be searched.
RICH = (
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Cc: carol@example.com\r\n"
    b"Bcc: dave@example.com\r\n"
    b"Subject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n"
    b"Date: Wed, 17 Jul 1996 23:44:25 -0700\r\n"
    b"X-Mailer: Folded\r\n"
    b" Header Value\r\n"
    b"X-Empty:\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=sep\r\n"
    b"\r\n"
    b"--sep\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Sch=C3=B6ne Gr=C3=BC=C3=9Fe vom Rhein=\r\n"
    b"ufer\r\n"
    b"--sep\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"Q3LobWUgYnL7bOllIHJlY2lwZSBpbnNpZGU=\r\n"
    b"--sep\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"c2VjcmV0IGJpbmFyeQ==\r\n"
    b"--sep--\r\n"
)

PLAIN = (
    b"From: zed@example.com\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: Lunch on =?iso-8859-1?q?Mittwoch_=E0_midi?=\r\n"
    b"Date: 1 Feb 1994 00:30:00 +1300\r\n"
    b"\r\n"
    b"Plain body with needle.\r\n"
)


class Loader:
    """The message's bytes, counting how often a search asked for them."""

    def __init__(self, raw: bytes) -> None:
        self.data = raw
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.data


def message(raw: bytes = RICH, *, seq: int = 1, uid: int = 10, flags: tuple[str, ...] = (),
            internal: datetime = datetime(2024, 3, 10, 23, 30, tzinfo=EST),
            size: int | None = None, recent: bool = False) -> SearchMessage:
    return SearchMessage(seq=seq, uid=uid, flags=set(flags), internal_date=internal,
                         size=len(raw) if size is None else size, recent=recent,
                         raw=Loader(raw))


CTX = SearchContext(max_seq=5, max_uid=50)


def key_of(args: str | list[bytes], charset: str | None = None) -> SearchKey:
    parts = [b"a SEARCH " + args.encode()] if isinstance(args, str) else args
    return parse_search(parse_command(parts).args, charset)


def with_literal(prefix: str, value: str) -> list[bytes]:
    """A SEARCH whose last argument is a literal holding value in UTF-8."""
    data = value.encode()
    return [f"a SEARCH {prefix} {{{len(data)}}}".encode(), data, b""]


def hits(args: str | list[bytes], msg: SearchMessage, ctx: SearchContext = CTX) -> bool:
    return matches(key_of(args), msg, ctx)


# --------------------------------------------------------------------------- flags and metadata


def test_all_matches_every_message() -> None:
    assert hits("ALL", message())


@pytest.mark.parametrize("key,flag", [("ANSWERED", "\\Answered"), ("DELETED", "\\Deleted"),
                                      ("DRAFT", "\\Draft"), ("FLAGGED", "\\Flagged"),
                                      ("SEEN", "\\Seen")])
def test_flag_keys_and_their_un_forms(key: str, flag: str) -> None:
    flagged, plain = message(flags=(flag,)), message()
    assert hits(key, flagged) and not hits(key, plain)
    assert hits("UN" + key, plain) and not hits("UN" + key, flagged)
    assert hits(key.lower(), flagged)  # keys are case-insensitive


def test_keyword_and_unkeyword() -> None:
    msg = message(flags=("$Forwarded", "Work"))
    assert hits("KEYWORD $Forwarded", msg)
    assert hits("KEYWORD work", msg)  # keywords compare case-insensitively
    assert not hits("KEYWORD Junk", msg)
    assert hits("UNKEYWORD Junk", msg)
    assert not hits("UNKEYWORD Work", msg)


def test_keyword_takes_a_keyword_not_a_system_flag() -> None:
    with pytest.raises(ParseError):
        key_of("KEYWORD \\Seen")


def test_recent_new_and_old() -> None:
    recent_unseen = message(recent=True)
    recent_seen = message(recent=True, flags=("\\Seen",))
    old = message()
    assert hits("RECENT", recent_unseen) and not hits("RECENT", old)
    assert hits("NEW", recent_unseen)
    assert not hits("NEW", recent_seen)
    assert not hits("NEW", old)
    assert hits("OLD", old) and not hits("OLD", recent_seen)


def test_larger_and_smaller_are_strict() -> None:
    msg = message(size=1000)
    assert hits("LARGER 999", msg) and not hits("LARGER 1000", msg)
    assert hits("SMALLER 1001", msg) and not hits("SMALLER 1000", msg)
    with pytest.raises(ParseError):
        key_of("LARGER 4294967296")


def test_a_bare_sequence_set_matches_message_numbers() -> None:
    assert hits("2:3", message(seq=3))
    assert not hits("2:3", message(seq=4))
    assert hits("*", message(seq=5))  # "*" is the message count
    assert hits("1,4:*", message(seq=5))
    assert not hits("*", message(seq=4))


def test_uid_matches_unique_identifiers() -> None:
    assert hits("UID 10", message(uid=10))
    assert hits("UID 1:4294967295", message(uid=10))
    assert not hits("UID 11:20", message(uid=10))
    assert hits("UID *", message(uid=50))  # "*" is the highest UID
    assert hits("UID 60:*", message(uid=50))  # 60:* includes the last message


@pytest.mark.parametrize("key,expected", [
    ("BEFORE 11-Mar-2024", True), ("BEFORE 10-Mar-2024", False),
    ("ON 10-Mar-2024", True), ("ON 11-Mar-2024", False),
    ("SINCE 10-Mar-2024", True), ("SINCE 11-Mar-2024", False),
    ('SINCE "9-Mar-2024"', True),
])
def test_internal_date_keys_compare_dates_disregarding_time_and_zone(key: str,
                                                                     expected: bool) -> None:
    # 23:30 -0500 is already 11 March in UTC; the date as the internal date carries it counts.
    assert hits(key, message()) is expected


@pytest.mark.parametrize("key,expected", [
    ("SENTON 17-Jul-1996", True), ("SENTON 18-Jul-1996", False),
    ("SENTBEFORE 18-Jul-1996", True), ("SENTBEFORE 17-Jul-1996", False),
    ("SENTSINCE 17-Jul-1996", True), ("SENTSINCE 18-Jul-1996", False),
])
def test_sent_date_keys_use_the_date_header_field(key: str, expected: bool) -> None:
    # 23:44:25 -0700 is 18 July in UTC; the calendar day as written counts.
    assert hits(key, message()) is expected


def test_sent_keys_never_match_without_a_usable_date() -> None:
    for raw in (b"Subject: x\r\n\r\nbody\r\n", b"Date: not a date\r\n\r\nbody\r\n"):
        msg = message(raw)
        for key in ("SENTON 1-Jan-2000", "SENTBEFORE 1-Jan-2100", "SENTSINCE 1-Jan-1900"):
            assert not hits(key, msg)
        assert hits("NOT SENTSINCE 1-Jan-1900", msg)


def test_malformed_dates_are_bad() -> None:
    for key in ("BEFORE 2024-03-10", "ON 31-Feb-2024", "SINCE", "SENTON tomorrow"):
        with pytest.raises(ParseError):
            key_of(key)


# --------------------------------------------------------------------------- strings


@pytest.mark.parametrize("key,expected", [
    ("FROM alice", True), ("FROM ALICE@EXAMPLE.ORG", True), ('FROM "Alice Example"', True),
    ("FROM bob", False),
    ("TO bob@example", True), ("TO carol", False),
    ("CC carol", True), ("CC dave", False),
    ("BCC dave", True), ("BCC carol", False),
    ("SUBJECT Köln", True), ("SUBJECT kÖLN", True), ("SUBJECT Berlin", False),
])
def test_address_and_subject_keys_are_case_insensitive_substrings(key: str,
                                                                  expected: bool) -> None:
    word, _, value = key.partition(" ")
    assert hits(with_literal(f"CHARSET UTF-8 {word}", value.strip('"')), message()) is expected
    if key.isascii():
        assert hits(f"CHARSET UTF-8 {key}", message()) is expected


def test_utf8_charset_search_finds_encoded_word_subjects() -> None:
    # "GRÜSSE" case-folds like "Grüße".
    assert hits(with_literal("CHARSET UTF-8 SUBJECT", "GRÜSSE AUS"), message())


def test_latin1_encoded_words_are_decoded() -> None:
    assert hits(with_literal("SUBJECT", "mittwoch à"), message(PLAIN))


def test_header_matches_a_named_field() -> None:
    msg = message()
    assert hits("HEADER X-Mailer folded", msg)
    assert hits("HEADER x-mailer \"folded header value\"", msg)  # unfolded
    assert not hits("HEADER X-Mailer outlook", msg)
    assert not hits("HEADER X-Other folded", msg)


def test_header_with_an_empty_string_matches_messages_having_the_field() -> None:
    assert hits('HEADER X-Empty ""', message())
    assert hits('HEADER X-Mailer ""', message())
    assert not hits('HEADER X-Missing ""', message())


def test_body_searches_decoded_text_parts_only() -> None:
    msg = message()
    assert hits("BODY rheinufer", msg)  # across a quoted-printable soft line break
    assert hits(with_literal("CHARSET UTF-8 BODY", "SCHÖNE grüsse"), msg)
    assert hits(with_literal("CHARSET UTF-8 BODY", "Crème Brûlée"), msg)  # Latin-1 in base64
    assert not hits("BODY secret", msg)  # an application/octet-stream attachment
    assert not hits("BODY c2VjcmV0", msg)
    assert not hits("BODY Alice", msg)  # the header is not the body


def test_text_searches_header_and_body() -> None:
    msg = message()
    assert hits("TEXT alice", msg)
    assert hits("TEXT rheinufer", msg)
    assert hits('TEXT "X-Mailer: Folded"', msg)
    assert not hits("TEXT nowhere", msg)


def test_plain_messages_without_mime_headers_are_text() -> None:
    msg = message(PLAIN)
    assert hits("BODY needle", msg)
    assert hits("SENTON 1-Feb-1994", msg)


def test_raw_utf8_header_fields_are_read_as_utf8() -> None:
    raw = "Subject: Grüße\r\n\r\nx\r\n".encode()
    assert hits(with_literal("CHARSET UTF-8 SUBJECT", "GRÜSS"), message(raw))


def test_bare_lf_messages_are_searched_too() -> None:
    raw = b"From: lf@example.com\nSubject: hello\n\nline body\n"
    assert hits("FROM lf@ SUBJECT hello BODY line", message(raw))


# --------------------------------------------------------------------------- combinations


def test_keys_are_anded() -> None:
    msg = message(flags=("\\Seen",), seq=2)
    assert hits("SEEN FROM alice 2", msg)
    assert not hits("SEEN FROM alice 3", msg)


def test_or_not_and_parentheses_combine() -> None:
    seen = message(flags=("\\Seen",))
    flagged = message(flags=("\\Flagged",))
    both = message(flags=("\\Seen", "\\Flagged"))
    neither = message()
    key = "OR SEEN FLAGGED"
    assert [hits(key, m) for m in (seen, flagged, both, neither)] == [True, True, True, False]
    key = "NOT (SEEN FLAGGED)"
    assert [hits(key, m) for m in (seen, flagged, both, neither)] == [True, True, False, True]
    key = "OR (SEEN FLAGGED) NOT OR SEEN FLAGGED"
    assert [hits(key, m) for m in (seen, flagged, both, neither)] == [False, False, True, True]
    key = "NOT NOT SEEN"
    assert [hits(key, m) for m in (seen, neither)] == [True, False]
    key = "OR OR SEEN DELETED (FLAGGED FROM alice)"
    assert [hits(key, m) for m in (seen, flagged, neither)] == [True, True, False]


def test_the_rfc_3501_example_search() -> None:
    key = key_of('FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"')
    assert matches(key, message(flags=("\\Flagged",)), CTX)
    assert not matches(key, message(flags=("\\Flagged",),
                                    raw=b"From: John Smith <js@example.com>\r\n\r\n"), CTX)


def test_parsed_keys_are_normalised() -> None:
    assert key_of("UNSEEN") == Not(Flag("\\Seen"))
    assert key_of("NEW") == And((Recent(), Not(Flag("\\Seen"))))
    assert key_of("OLD") == Not(Recent())
    assert key_of("FROM Bob") == Header("from", "bob")
    assert key_of("HEADER Message-ID <X@Y>") == Header("message-id", "<x@y>")
    assert key_of("BODY x TEXT y") == And((Body("x"), Text("y")))
    assert key_of("BEFORE 1-Feb-1994") == InternalDate("before", date(1994, 2, 1))
    assert key_of("SENTSINCE 1-Feb-1994") == SentDate("since", date(1994, 2, 1))
    assert key_of("LARGER 5") == Size("larger", 5)
    assert key_of("1:3") == SeqSet(SequenceSet.parse("1:3"))
    assert key_of("UID 1:3") == UidSet(SequenceSet.parse("1:3"))
    assert key_of("ALL") == All()
    # Keys that need the message's bytes go last in a conjunction or disjunction.
    assert key_of("BODY x SEEN") == And((Flag("\\Seen"), Body("x")))
    assert key_of("OR SUBJECT x OR SEEN DELETED") == Or(
        (Flag("\\Seen"), Flag("\\Deleted"), Header("subject", "x")))
    assert key_of("(((SEEN)))") == Flag("\\Seen")


def test_needs_raw_tells_which_keys_read_the_message() -> None:
    for key in ("ALL", "SEEN", "NOT DELETED", "OR RECENT 1:3", "UID 5 LARGER 3",
                "BEFORE 1-Jan-2000", "KEYWORD x"):
        assert not needs_raw(key_of(key))
    for key in ("FROM x", "SUBJECT x", "HEADER a b", "BODY x", "TEXT x", "SENTON 1-Jan-2000",
                "SEEN NOT BODY x", "OR SEEN TO x"):
        assert needs_raw(key_of(key))


def test_flag_only_searches_never_load_the_message() -> None:
    msg = message(flags=("\\Seen",))
    for key in ("SEEN", "UNSEEN LARGER 5", "OR FLAGGED NOT RECENT", "UID 1:* SINCE 1-Jan-2000"):
        hits(key, msg)
    assert msg.raw.calls == 0


def test_the_message_is_not_loaded_when_a_cheap_key_already_decides() -> None:
    unseen = message()
    assert not hits("BODY needle SEEN", unseen)
    assert not hits("FROM alice SUBJECT x 3:4", unseen)
    assert unseen.raw.calls == 0


def test_the_message_is_loaded_once_per_search() -> None:
    msg = message()
    assert hits("FROM alice BODY rheinufer SENTON 17-Jul-1996 TEXT bob", msg)
    assert msg.raw.calls == 1


# --------------------------------------------------------------------------- charsets and errors


def test_utf8_and_us_ascii_charsets_are_accepted() -> None:
    for charset in ("UTF-8", "utf-8", "US-ASCII", '"us-ascii"'):
        assert key_of(f"CHARSET {charset} ALL") == All()
    assert key_of("ALL", charset="UTF-8") == All()


def test_other_charsets_are_refused_with_badcharset() -> None:
    with pytest.raises(BadCharset) as info:
        key_of("CHARSET ISO-8859-1 ALL")
    assert info.value.charset == "ISO-8859-1"
    assert info.value.supported == ("UTF-8", "US-ASCII")
    assert isinstance(info.value, ParseError)
    with pytest.raises(BadCharset):
        key_of("ALL", charset="KOI8-R")


def test_charset_must_name_a_charset_and_come_once() -> None:
    with pytest.raises(ParseError):
        key_of("CHARSET")
    with pytest.raises(ParseError):
        key_of("CHARSET UTF-8 ALL", charset="UTF-8")


def test_search_strings_must_be_valid_utf8() -> None:
    with pytest.raises(ParseError):
        key_of([b"a SEARCH CHARSET UTF-8 BODY {2}", b"\xc3\x28", b""])


@pytest.mark.parametrize("args", [
    "", "()", "FOO", "FROM", "HEADER Subject", "OR SEEN", "NOT", "UID", "UID x", "LARGER x",
    "0", "1:0", "4294967296", '"SEEN"', "SEEN (FLAGGED", "KEYWORD", "SMALLER -1",
])
def test_malformed_search_programs_are_bad(args: str) -> None:
    with pytest.raises(ParseError):
        key_of([f"a SEARCH {args}".rstrip().encode()])


def test_the_number_of_keys_is_limited_not_their_depth() -> None:
    # NOT and OR chains thousands deep parse and evaluate without exhausting the stack.
    deep_not = key_of("NOT " * (MAX_SEARCH_KEYS - 1) + "ALL")
    assert not matches(deep_not, message(), CTX)
    chain = key_of("OR ALL " * (MAX_SEARCH_KEYS // 2 - 1) + "ALL")
    assert matches(chain, message(), CTX)
    alternating = key_of("NOT OR SEEN " * 3000 + "ALL")  # no flattening can shorten this
    assert matches(alternating, message(flags=("\\Seen",)), CTX) is False
    with pytest.raises(TooComplex):
        key_of("NOT " * MAX_SEARCH_KEYS + "ALL")
    with pytest.raises(TooComplex):
        key_of("OR ALL " * MAX_SEARCH_KEYS + "ALL")
    with pytest.raises(ParseError):
        key_of("(" * 40 + "ALL" + ")" * 40)  # the tokenizer's own limit


def test_a_uid_search_over_many_messages_is_fast() -> None:
    key = key_of("UID 1:4294967295 UNSEEN")
    ctx = SearchContext(max_seq=100_000, max_uid=100_000)
    start = time.perf_counter()
    count = sum(matches(key, message(seq=i, uid=i), ctx) for i in range(1, 100_001))
    assert count == 100_000
    assert time.perf_counter() - start < 10.0
