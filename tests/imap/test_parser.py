"""The IMAP command grammar (RFC 3501 9, LITERAL+ RFC 7888, literal8 RFC 3516)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from mailsuite.imap.parser import (
    MAX_DEPTH,
    Atom,
    Command,
    FetchAtt,
    LiteralString,
    ParenList,
    ParseError,
    QuotedString,
    SequenceSet,
    astring,
    is_nil,
    list_mailbox,
    list_pattern,
    literal_at_end,
    mailbox_name,
    mailbox_pattern,
    nstring,
    number,
    nz_number,
    parse_command,
    parse_date,
    parse_datetime,
    parse_flag,
    parse_flag_list,
    parse_sequence_set,
    quote,
)


def parse(line: bytes | str) -> Command:
    return parse_command([line.encode() if isinstance(line, str) else line])


def fetch_items(line: str) -> list:
    args = parse(line).args
    item = args[1]
    return item.items if isinstance(item, ParenList) else [item]


# --------------------------------------------------------------------------- command line


def test_a_command_is_a_tag_a_name_and_arguments() -> None:
    cmd = parse("a001 login SMITH sesame")
    assert cmd == Command("a001", "LOGIN", [Atom("SMITH"), Atom("sesame")])


def test_command_names_are_case_insensitive() -> None:
    assert parse("x NoOp").name == "NOOP"


def test_uid_commands_are_named_with_their_subcommand() -> None:
    cmd = parse("A999 UID fetch 4827313:4828442 FLAGS")
    assert cmd.name == "UID FETCH"
    assert cmd.args == [Atom("4827313:4828442"), Atom("FLAGS")]


def test_uid_without_a_subcommand_is_bad() -> None:
    with pytest.raises(ParseError) as info:
        parse("a UID")
    assert info.value.tag == "a"


@pytest.mark.parametrize("line", [b"", b" NOOP", b"a+b NOOP", b"a*b NOOP", b"a NOOP\x00",
                                  b"a{1} NOOP", b'"a" NOOP', b"NOOP"])
def test_a_tag_is_astring_chars_except_plus_followed_by_sp(line: bytes) -> None:
    with pytest.raises(ParseError):
        parse_command([line])


def test_a_tag_may_contain_close_bracket() -> None:
    assert parse("a]1 NOOP").tag == "a]1"


def test_parse_errors_after_the_tag_carry_the_tag() -> None:
    with pytest.raises(ParseError) as info:
        parse('t42 LOGIN "unterminated')
    assert info.value.tag == "t42"


def test_arguments_are_separated_by_exactly_one_space() -> None:
    for line in ("a LOGIN  x y", "a NOOP ", "a LOGIN x y ", "a FETCH 1 ( FLAGS)",
                 "a FETCH 1 (FLAGS )", "a FETCH 1 (FLAGS)(UID)"):
        with pytest.raises(ParseError):
            parse(line)


def test_nil_is_an_atom_that_nstring_reads_as_absent() -> None:
    cmd = parse("a ID NIL")
    assert cmd.args == [Atom("NIL")]
    assert is_nil(cmd.args[0])
    assert nstring(cmd.args[0]) is None
    assert nstring(Atom("nil")) is None
    # ...and an astring reads it as the text NIL (a mailbox may be called that).
    assert astring(cmd.args[0]) == b"NIL"


def test_empty_parenthesised_lists_are_allowed() -> None:
    assert parse("a STORE 1 FLAGS ()").args[2] == ParenList([])
    assert parse("a X (())").args == [ParenList([ParenList([])])]


def test_octets_outside_7bit_in_atoms_are_bad() -> None:
    for line in (b"a SELECT caf\xc3\xa9", b"a SELECT a\x01b", b"a SELECT a\x7fb"):
        with pytest.raises(ParseError):
            parse_command([line])


# --------------------------------------------------------------------------- strings


def test_quoted_strings_unescape_backslash_and_dquote() -> None:
    cmd = parse(r'a LOGIN "fred \"the\" fox" "back\\slash"')
    assert cmd.args == [QuotedString(b'fred "the" fox'), QuotedString(b"back\\slash")]


def test_quoted_strings_may_be_empty() -> None:
    assert parse('a LIST "" ""').args == [QuotedString(b""), QuotedString(b"")]


@pytest.mark.parametrize("line", [r'a LOGIN "a\b" x', 'a LOGIN "abc', 'a LOGIN "a"b x',
                                  'a LOGIN "a\rb" x', 'a LOGIN "a\x00b" x', 'a LOGIN "abc\\'])
def test_malformed_quoted_strings_are_bad(line: str) -> None:
    with pytest.raises(ParseError):
        parse(line)


def test_quoted_strings_may_hold_8bit_utf8() -> None:
    assert parse_command([b'a SELECT "caf\xc3\xa9"']).args == [QuotedString(b"caf\xc3\xa9")]


def test_a_literal_is_the_octets_after_the_line_ending_in_its_marker() -> None:
    cmd = parse_command([b"a LOGIN {5}", b'fr"ed', b" {6+}", b"pa\r\nss", b""])
    assert cmd.args == [LiteralString(b'fr"ed'), LiteralString(b"pa\r\nss")]


def test_literals_inside_lists() -> None:
    cmd = parse_command([b"a X (one {3}", b"two", b" (three {0}", b"", b") four)"])
    assert cmd.args == [ParenList([Atom("one"), LiteralString(b"two"),
                                   ParenList([Atom("three"), LiteralString(b"")]),
                                   Atom("four")])]


def test_a_literal8_is_marked_binary() -> None:
    cmd = parse_command([b"a APPEND INBOX ~{3}", b"a\x00b", b""])
    assert cmd.args == [Atom("INBOX"), LiteralString(b"a\x00b", binary=True)]


def test_append_with_flags_date_and_literal() -> None:
    cmd = parse_command([b'A003 APPEND saved-messages (\\Seen) "17-Jul-1996 02:44:25 -0700" {5}',
                         b"Hello", b""])
    assert cmd.name == "APPEND"
    mailbox, flags, when, message = cmd.args
    assert mailbox_name(mailbox) == "saved-messages"
    assert parse_flag_list(flags) == ["\\Seen"]
    assert parse_datetime(when) == datetime(1996, 7, 17, 2, 44, 25,
                                            tzinfo=timezone(-timedelta(hours=7)))
    assert message == LiteralString(b"Hello")


def test_a_literal_whose_length_differs_from_its_marker_is_bad() -> None:
    with pytest.raises(ParseError):
        parse_command([b"a LOGIN {5}", b"four", b" x"])


def test_a_literal_marker_must_end_its_line() -> None:
    with pytest.raises(ParseError):
        parse_command([b"a LOGIN {3}abc x"])
    with pytest.raises(ParseError):
        parse_command([b"a LOGIN {3}"])  # the literal is missing
    with pytest.raises(ParseError):
        parse_command([b"a NOOP", b"abc", b""])  # data without a marker


def test_an_even_number_of_pieces_is_not_a_command() -> None:
    with pytest.raises(ParseError):
        parse_command([b"a LOGIN {3}", b"abc"])
    with pytest.raises(ParseError):
        parse_command([])


def test_literal_at_end_reports_size_and_synchronisation() -> None:
    assert literal_at_end(b"a LOGIN {5}") == (5, False)
    assert literal_at_end(b"a LOGIN {5+}") == (5, True)
    assert literal_at_end(b"a APPEND x ~{1024}") == (1024, False)
    assert literal_at_end(b"a APPEND x {0}") == (0, False)
    assert literal_at_end(b"a APPEND x {4294967295}") == (4294967295, False)


def test_literal_at_end_ignores_lines_without_a_marker() -> None:
    for line in (b"a NOOP", b"", b"}", b"a SELECT foo}", b"a SELECT {}", b"a SELECT {+}",
                 b"a SELECT {1a}", b"a SELECT 12345678901}", b'a SELECT "x"'):
        assert literal_at_end(line) is None


def test_huge_literal_sizes_are_rejected_without_allocating() -> None:
    with pytest.raises(ParseError):
        literal_at_end(b"a APPEND INBOX {99999999999}")
    with pytest.raises(ParseError):
        literal_at_end(b"a APPEND INBOX {4294967296+}")
    # Far more digits than int() would accept (sys.get_int_max_str_digits): no conversion.
    with pytest.raises(ParseError):
        literal_at_end(b"a APPEND INBOX {" + b"9" * 100_000 + b"}")
    with pytest.raises(ParseError):
        parse_command([b"a LOGIN {" + b"9" * 100_000 + b"}", b"", b""])


# --------------------------------------------------------------------------- nesting


def test_parenthesis_nesting_is_limited() -> None:
    ok = "a X " + "(" * MAX_DEPTH + ")" * MAX_DEPTH
    parse(ok)
    too_deep = "a X " + "(" * (MAX_DEPTH + 1) + ")" * (MAX_DEPTH + 1)
    with pytest.raises(ParseError, match="deep"):
        parse(too_deep)


def test_hostile_nesting_fails_fast_without_recursion_error() -> None:
    with pytest.raises(ParseError):
        parse("a X " + "(" * 100_000)


def test_unbalanced_parentheses_are_bad() -> None:
    for line in ("a X (a b", "a X a)", "a X ((a)", "a X )"):
        with pytest.raises(ParseError):
            parse(line)


# --------------------------------------------------------------------------- fetch attributes


def test_body_section_with_header_fields_and_partial_is_one_token() -> None:
    items = fetch_items("a FETCH 1 (FLAGS BODY.PEEK[HEADER.FIELDS (DATE FROM)]<0.100> UID)")
    assert items == [Atom("FLAGS"),
                     FetchAtt("BODY.PEEK", (), "HEADER.FIELDS", ("DATE", "FROM"), (0, 100)),
                     Atom("UID")]
    assert str(items[1]) == "BODY.PEEK[HEADER.FIELDS (DATE FROM)]<0.100>"
    assert items[1].peek


def test_empty_body_section_with_partial() -> None:
    (att,) = fetch_items("a FETCH 1 BODY[]<0.10>")
    assert att == FetchAtt("BODY", (), None, (), (0, 10))
    assert att.section == ""
    assert not att.peek


def test_body_peek_part_mime() -> None:
    (att,) = fetch_items("a FETCH 1 body.peek[1.2.mime]")
    assert att == FetchAtt("BODY.PEEK", (1, 2), "MIME")
    assert att.section == "1.2.MIME"


@pytest.mark.parametrize("text,expected", [
    ("BODY[HEADER]", FetchAtt("BODY", (), "HEADER")),
    ("BODY[TEXT]", FetchAtt("BODY", (), "TEXT")),
    ("BODY[3]", FetchAtt("BODY", (3,))),
    ("BODY[4.2.HEADER]", FetchAtt("BODY", (4, 2), "HEADER")),
    ("BODY[4.2.TEXT]", FetchAtt("BODY", (4, 2), "TEXT")),
    ("BODY[HEADER.FIELDS.NOT (Received)]",
     FetchAtt("BODY", (), "HEADER.FIELDS.NOT", ("Received",))),
    ("BINARY[1]", FetchAtt("BINARY", (1,))),
    ("BINARY.PEEK[1.2]<5.5>", FetchAtt("BINARY.PEEK", (1, 2), partial=(5, 5))),
    ("BINARY.SIZE[2]", FetchAtt("BINARY.SIZE", (2,))),
])
def test_section_specs(text: str, expected: FetchAtt) -> None:
    assert fetch_items(f"a FETCH 1 ({text})") == [expected]


def test_header_field_names_may_be_quoted_or_literal() -> None:
    cmd = parse_command([b'a FETCH 1 BODY[HEADER.FIELDS ("Subject" {4}', b"Date", b")]"])
    assert cmd.args[1] == FetchAtt("BODY", (), "HEADER.FIELDS", ("Subject", "Date"))


@pytest.mark.parametrize("text", [
    "BODY[MIME]",  # MIME needs a part
    "BODY[0]",  # parts are nz-numbers
    "BODY[1.]", "BODY[.1]", "BODY[1..2]",
    "BODY[HEADER.FIELDS]",  # header list missing
    "BODY[HEADER.FIELDS ()]",  # header list empty
    "BODY[HEADER.FIELDS (A:B)]",
    "BODY[HEADER.FIELDS (DATE]", "BODY[HEADER", "BODY[FOO]",
    "BODY[]<0>", "BODY[]<0.0>", "BODY[]<1.2", "BODY[]<0.10>x", "BODY[]x",
    "BINARY[HEADER]", "BINARY.SIZE[1]<0.5>",
    "BODY[]<99999999999.1>",
])
def test_malformed_sections_are_bad(text: str) -> None:
    with pytest.raises(ParseError):
        parse(f"a FETCH 1 {text}")


def test_bracketed_mailbox_names_stay_atoms() -> None:
    cmd = parse("a LIST \"\" [Gmail]/%")
    assert cmd.args[1] == Atom("[Gmail]/%")
    assert mailbox_name(parse("a SELECT [Gmail]/Sent").args[0]) == "[Gmail]/Sent"


# --------------------------------------------------------------------------- argument helpers


def test_astring_accepts_atom_quoted_and_literal_but_not_wildcards() -> None:
    assert astring(Atom("abc]")) == b"abc]"
    assert astring(QuotedString(b"a b")) == b"a b"
    assert astring(LiteralString(b"x")) == b"x"
    for bad in (Atom("a*"), Atom("a%"), Atom("\\Seen"), ParenList([])):
        with pytest.raises(ParseError):
            astring(bad)


def test_list_mailbox_allows_wildcards_in_atoms() -> None:
    assert list_mailbox(Atom("foo/%")) == b"foo/%"
    assert list_mailbox(Atom("*")) == b"*"
    assert list_pattern(Atom("~peter/mail/&U,BTFw-/*")) == "~peter/mail/台北/*"


def test_mailbox_names_are_decoded_from_modified_utf7() -> None:
    assert mailbox_name(Atom("~peter/mail/&U,BTFw-/&ZeVnLIqe-")) == "~peter/mail/台北/日本語"
    with pytest.raises(ParseError):
        mailbox_name(Atom("&U,BTFw"))
    with pytest.raises(ParseError):
        mailbox_name(QuotedString("台北".encode()))


def test_mailbox_names_are_utf8_under_utf8_accept() -> None:
    assert mailbox_name(QuotedString("台北".encode()), utf8=True) == "台北"


def test_inbox_is_case_insensitive() -> None:
    assert mailbox_name(Atom("inbox")) == "INBOX"
    assert mailbox_name(Atom("InBoX/Sub")) == "INBOX/Sub"
    assert mailbox_name(Atom("inboxes")) == "inboxes"


def test_numbers_are_32_bit() -> None:
    assert number(Atom("0")) == 0
    assert number(Atom("4294967295")) == 4294967295
    assert nz_number(Atom("1")) == 1
    for bad in ("4294967296", "-1", "1.5", "", "99999999999999999999999"):
        with pytest.raises(ParseError):
            number(Atom(bad))
    with pytest.raises(ParseError):
        nz_number(Atom("0"))


def test_flags_system_flags_are_canonicalised_keywords_kept() -> None:
    flags = parse(r"a STORE 1 +FLAGS (\seen \ANSWERED $Forwarded \Custom \Seen)").args[2]
    assert parse_flag_list(flags) == ["\\Seen", "\\Answered", "$Forwarded", "\\Custom"]


@pytest.mark.parametrize("token", [Atom("\\"), Atom("\\*"), Atom("a]"), Atom("a%"),
                                   QuotedString(b"x"), ParenList([])])
def test_invalid_flags_are_bad(token) -> None:
    with pytest.raises(ParseError):
        parse_flag(token)


def test_a_flag_list_must_be_parenthesised() -> None:
    with pytest.raises(ParseError):
        parse_flag_list(Atom("\\Seen"))


def test_quote_produces_an_astring() -> None:
    assert quote("DATE") == "DATE"
    assert quote("a b") == '"a b"'
    assert quote('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert quote("NIL") == '"NIL"'
    assert quote("") == '""'


# --------------------------------------------------------------------------- dates


def test_parse_date_reads_rfc_3501_dates() -> None:
    assert parse_date("1-Feb-1994") == date(1994, 2, 1)
    assert parse_date('"01-feb-1994"') == date(1994, 2, 1)
    assert parse_date(Atom("29-Feb-2024")) == date(2024, 2, 29)
    assert parse_date(QuotedString(b"31-DEC-1999")) == date(1999, 12, 31)


@pytest.mark.parametrize("text", ["1-Feb-94", "1-Fbr-1994", "30-Feb-1994", "1 Feb 1994",
                                  "001-Feb-1994", "1-Feb-0000", '"1-Feb-1994', ""])
def test_parse_date_rejects_malformed_dates(text: str) -> None:
    with pytest.raises(ParseError):
        parse_date(text)


def test_parse_datetime_is_aware() -> None:
    dt = parse_datetime('"17-Jul-1996 02:44:25 -0700"')
    assert dt == datetime(1996, 7, 17, 9, 44, 25, tzinfo=UTC)
    assert dt.utcoffset() == -timedelta(hours=7)
    assert parse_datetime(" 7-Jul-1996 02:44:25 +0000").day == 7
    assert parse_datetime(b"07-Jul-1996 23:59:60 +0130").second == 59


@pytest.mark.parametrize("text", ["17-Jul-1996 02:44:25", "17-Jul-1996 24:00:00 +0000",
                                  "17-Jul-1996 02:61:00 +0000", "17-Jul-1996 02:44:25 +2400",
                                  "17-Jul-1996 02:44:25 0700", "17-Jul-1996 2:44:25 +0000"])
def test_parse_datetime_rejects_malformed_date_times(text: str) -> None:
    with pytest.raises(ParseError):
        parse_datetime(text)


# --------------------------------------------------------------------------- sequence sets


def test_sequence_sets_resolve_star_and_normalise() -> None:
    s = SequenceSet.parse("1,3:5,7:*,*")
    assert s.resolve(10) == [(1, 1), (3, 5), (7, 10)]
    assert str(s) == "1,3:5,7:*,*"
    assert s.has_star


def test_a_range_may_be_written_backwards() -> None:
    assert SequenceSet.parse("5:2").resolve(10) == [(2, 5)]
    # "559:*" includes the highest UID even when it is below 559 (RFC 3501 6.4.8).
    assert SequenceSet.parse("559:*").resolve(100) == [(100, 559)]


def test_overlapping_and_adjacent_ranges_merge() -> None:
    assert SequenceSet.parse("4:6,1:2,3,10,8:9").resolve(20) == [(1, 6), (8, 10)]


def test_star_in_an_empty_mailbox_stands_for_nothing() -> None:
    assert SequenceSet.parse("*").resolve(0) == []
    assert SequenceSet.parse("3:*").resolve(0) == [(1, 3)]


def test_sequence_set_limits_are_1_and_4294967295() -> None:
    assert SequenceSet.parse("4294967295").resolve(1) == [(4294967295, 4294967295)]
    assert SequenceSet.parse("1:4294967295").contains(4294967295, 5)
    for bad in ("0", "0:5", "1:0", "4294967296", "1:4294967296", "", ",", "1,", ",1", "1,,2",
                "1:2:3", "a", "-1", "1 2", "$", "99999999999999999999999999"):
        with pytest.raises(ParseError):
            SequenceSet.parse(bad)


def test_contains_uses_the_resolved_ranges() -> None:
    s = SequenceSet.parse("2:4,9:*")
    assert [v for v in range(1, 13) if s.contains(v, 10)] == [2, 3, 4, 9, 10]


def test_select_picks_uids_from_a_sorted_list() -> None:
    uids = [1, 5, 9, 10, 11, 40, 100]
    assert SequenceSet.parse("2:10,40:*").select(uids, 100) == [5, 9, 10, 40, 100]
    assert SequenceSet.parse("*").select(uids, 100) == [100]
    assert SequenceSet.parse("101:*").select(uids, 100) == [100]  # that is 100:101
    assert SequenceSet.parse("101:200").select(uids, 100) == []
    assert SequenceSet.parse("1:*").select([], 0) == []


def test_a_full_uid_range_over_many_messages_is_fast() -> None:
    uids = list(range(1, 300_001, 3))
    start = time.perf_counter()
    got = SequenceSet.parse("1:4294967295").select(uids, uids[-1])
    assert time.perf_counter() - start < 1.0
    assert got == uids


def test_parse_sequence_set_needs_an_atom() -> None:
    assert parse_sequence_set(Atom("1:*")) == SequenceSet.parse("1:*")
    with pytest.raises(ParseError):
        parse_sequence_set(QuotedString(b"1"))


def test_from_values_compresses_runs() -> None:
    assert str(SequenceSet.from_values([7, 1, 2, 3, 5, 6, 9])) == "1:3,5:7,9"


# --------------------------------------------------------------------------- LIST patterns


def test_star_matches_across_the_hierarchy_delimiter() -> None:
    match = mailbox_pattern("", "*")
    assert all(match(n) for n in ("INBOX", "a", "a/b/c", ""))
    assert mailbox_pattern("", "a/*")("a/b/c")


def test_percent_does_not_match_the_hierarchy_delimiter() -> None:
    match = mailbox_pattern("", "%")
    assert match("INBOX")
    assert not match("a/b")
    sub = mailbox_pattern("", "a/%")
    assert sub("a/b")
    assert not sub("a/b/c")
    assert not sub("a")


def test_reference_and_pattern_are_concatenated() -> None:
    match = mailbox_pattern("archive/", "%")
    assert match("archive/2024")
    assert not match("archive/2024/jan")
    assert not match("other")
    assert mailbox_pattern("~smith/Mail/", "foo.*")("~smith/Mail/foo.bar/x")


def test_pattern_matching_is_case_sensitive_except_inbox() -> None:
    assert not mailbox_pattern("", "Sent")("sent")
    assert mailbox_pattern("", "inbox")("INBOX")
    assert mailbox_pattern("", "InBox/%")("INBOX/Sub")
    assert not mailbox_pattern("", "InBox/sub")("INBOX/Sub")
    assert mailbox_pattern("", "inb*")("INBOX")
    assert not mailbox_pattern("", "inboxes")("INBOXES")


def test_literal_characters_must_all_match() -> None:
    match = mailbox_pattern("", "a%c")
    assert match("abc")
    assert match("ac")
    assert not match("abd")
    assert not match("a/c")


def test_wildcard_heavy_patterns_do_not_blow_up() -> None:
    pattern = "*%*%*%*%*%*%*%a"
    name = "b" * 1000
    start = time.perf_counter()
    assert not mailbox_pattern("", pattern)(name)
    assert not mailbox_pattern("", "%a" * 200 + "%b")("a" * 1000)
    assert mailbox_pattern("", pattern)(name + "a")
    assert not mailbox_pattern("", "%%%%%%%%%%%%%%a")("/".join(["b"] * 500))
    assert time.perf_counter() - start < 1.0
