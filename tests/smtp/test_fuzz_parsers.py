"""Fuzz targets (Hypothesis) for the SMTP path and address parser and the header parsers.

Properties: nothing but the defined error is ever raised, valid input round-trips, the
streaming header checker gives the same verdict however the input is cut into pieces and
agrees with the header splitter, and large hostile inputs cost linear time. Each target is
bounded to a few seconds.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsuite.addresses import AddressError, parse_mailbox, parse_path
from mailsuite.mime import (
    HeaderChecker,
    HeaderLimits,
    header_fields,
    remove_fields,
    split_message,
)
from mailsuite.smtp.server import _split_path

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
LIMITS = HeaderLimits(max_field_size=2000, max_section_size=8000, max_fields=50)
ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"

local_parts = st.lists(st.text(ATEXT, min_size=1, max_size=10), min_size=1, max_size=4).map(
    ".".join).filter(lambda s: len(s) <= 64)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
# Text an attacker might send after MAIL FROM: or RCPT TO:, biased towards the syntax.
path_text = st.text(st.sampled_from(list('<>@."\\:,[] =\t') + list("aZ9é\x00\x7f")),
                    max_size=80) | st.text(max_size=80)


def linear_time(make: Callable[[int], bytes], run: Callable[[bytes], object],
                small: int = 500_000) -> tuple[float, float]:
    """(seconds for `small`, seconds for 8 x small): the second must not grow quadratically.

    CPU time of this process, best of three, without the garbage collector: what other
    processes (the other xdist worker, servers) do must not make a linear parse look slow.
    """
    timings = []
    for size in (small, small * 8):
        data = make(size)
        best = float("inf")
        gc.disable()
        try:
            for _ in range(3):
                started = time.process_time()
                run(data)
                best = min(best, time.process_time() - started)
        finally:
            gc.enable()
        timings.append(best)
    return timings[0], timings[1]


# --- SMTP paths and addresses ----------------------------------------------------------------
@FUZZ
@given(path_text)
def test_path_parser_raises_only_address_error(text: str) -> None:
    path, params = _split_path(text)
    assert isinstance(path, str)
    assert all(name == name.upper() for name, _ in params)
    with contextlib.suppress(AddressError):
        parse_path(path)


@FUZZ
@given(st.text(max_size=400))
def test_mailbox_parser_raises_only_address_error(text: str) -> None:
    try:
        address = parse_mailbox(text)
    except AddressError:
        return
    assert str(address) == text  # what is accepted is kept exactly


@FUZZ
@given(local_parts, domains, st.lists(st.sampled_from(["SIZE=100", "BODY=8BITMIME",
                                                       "SMTPUTF8"]), max_size=3))
def test_valid_paths_round_trip_through_the_command_parser(local: str, domain: str,
                                                            params: list[str]) -> None:
    argument = " ".join([f"<{local}@{domain}>", *params])
    path, parsed = _split_path(argument)
    address = parse_path(path)
    assert address is not None and str(address) == f"{local}@{domain}"
    assert [f"{n}={v}" if v is not None else n for n, v in parsed] == params


def test_path_parsing_is_linear_on_long_hostile_input() -> None:
    def run(data: bytes) -> None:
        text = data.decode()
        path, _ = _split_path(text)
        with contextlib.suppress(AddressError):
            parse_path(path)

    small, large = linear_time(lambda n: b"<" + b'"\\' * (n // 2), run, small=200_000)
    assert large < max(small * 20, 0.5), (small, large)
    small, large = linear_time(lambda n: b"<a@" + b"a." * (n // 2) + b">", run, small=200_000)
    assert large < max(small * 20, 0.5), (small, large)


# --- the streaming header checker ------------------------------------------------------------
header_bytes = st.lists(
    st.sampled_from([b"Subject: x\r\n", b" folded\r\n", b"\tmore\r\n", b"X-A:\r\n", b"\r\n",
                     b"no colon\r\n", b"Bad Name: y\r\n", b"\x00: z\r\n", b"\xc3\xa9: 8\r\n",
                     b".Dot: d\r\n", b"..\r\n", b"\r", b"\n", b"x" * 700, b" " * 300 + b"\r\n"])
    | st.binary(max_size=40), max_size=40).map(b"".join)


def verdict(checker: HeaderChecker) -> tuple[bool, str | None, int]:
    violation = checker.violation
    return checker.done, None if violation is None else violation.kind, checker.fields


@FUZZ
@given(header_bytes, st.lists(st.integers(0, 2000), max_size=10), st.booleans())
def test_checker_verdict_does_not_depend_on_how_the_input_is_cut(
        data: bytes, cuts: list[int], stuffed: bool) -> None:
    whole = HeaderChecker(LIMITS, dot_stuffed=stuffed)
    whole.feed(data)
    pieces = HeaderChecker(LIMITS, dot_stuffed=stuffed)
    last = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        pieces.feed(data[last:cut])
        last = cut
    pieces.feed(data[last:])
    assert verdict(pieces) == verdict(whole)


@FUZZ
@given(header_bytes)
def test_checker_agrees_with_the_header_splitter(data: bytes) -> None:
    checker = HeaderChecker(LIMITS)
    checker.feed(data)
    if not checker.done or checker.violation is not None:
        return
    header, _ = split_message(data)
    fields = list(header_fields(header))
    assert len(fields) == checker.fields
    assert all(field.name and ":" in field.raw.decode("latin-1") for field in fields)
    assert sum(len(field.raw) for field in fields) <= LIMITS.max_section_size


@FUZZ
@given(st.lists(st.sampled_from([b"A: 1\r\n", b" fold\r\n", b"B:\r\n", b"C: \xff\r\n"]),
                max_size=30).map(b"".join), st.binary(max_size=50))
def test_header_split_round_trips(header: bytes, body: bytes) -> None:
    raw = header + b"\r\n" + body
    parsed_header, parsed_body = split_message(raw)
    if not header.startswith((b" ", b"\r\n")):
        assert parsed_header == header or header == b""
        assert b"".join(field.raw for field in header_fields(parsed_header)) == parsed_header
    assert remove_fields(raw, lambda field: False) == raw
    kept = remove_fields(raw, lambda field: field.name == "B")
    assert b"\r\nB:" not in split_message(kept)[0] and not kept.startswith(b"B:")
    assert parsed_body == body or header == b""


def test_checker_is_linear_on_hostile_shapes() -> None:
    big = HeaderLimits(max_field_size=1 << 40, max_section_size=1 << 40, max_fields=1 << 40)

    def run(data: bytes) -> None:
        checker = HeaderChecker(big, dot_stuffed=True)
        for start in range(0, len(data), 4096):  # as DATA arrives, in packets
            checker.feed(data[start:start + 4096])

    shapes = [
        lambda n: b"X: a\r\n" + b" x\r\n" * (n // 4),  # one field of minimal folds
        lambda n: b"X: x\r\n" * (n // 6),  # many tiny fields
        lambda n: b"X: " + b"a" * n,  # one line that never ends
        lambda n: b"X: a" + b"\r" * n,  # CRs that never become a CRLF
    ]
    for make in shapes:
        small, large = linear_time(make, run)
        assert large < max(small * 20, 0.5), (small, large)


def test_header_splitter_is_linear_on_a_folded_header() -> None:
    def run(data: bytes) -> None:
        header, _ = split_message(data)
        assert len(list(header_fields(header))) >= 1
        remove_fields(data, lambda field: field.name == "Y")

    small, large = linear_time(lambda n: b"X: a\r\n" + b" x\r\n" * (n // 4) + b"Y: 1\r\n\r\nb",
                               run)
    assert large < max(small * 20, 0.5), (small, large)


def test_a_new_field_arriving_in_pieces_is_not_counted_into_the_previous_one() -> None:
    limits = HeaderLimits(max_field_size=1000, max_section_size=2003, max_fields=10)
    first = b"A: " + b"x" * 995 + b"\r\n"  # 1000 octets: exactly at the field limit
    data = first + b"B: " + b"y" * 995 + b"\r\n\r\n"  # the section ends exactly at its limit
    for cut in range(len(first), len(data)):
        checker = HeaderChecker(limits)
        checker.feed(data[:cut])
        checker.feed(data[cut:])
        assert verdict(checker) == (True, None, 2), cut
