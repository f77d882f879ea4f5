"""Fuzz targets for the MIME structure walker (mailsuite.structure): on any octets it returns
an ENVELOPE, BODYSTRUCTURE, sections and text parts without raising, its BODYSTRUCTURE is
well-formed IMAP data, and adversarial nesting (50,000 multipart or message/rfc822 levels,
100,000 parts, huge headers) costs time linear in the message.

Each target runs a bounded number of examples (a few seconds in all).
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsuite import structure

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HEADER_NAMES = ["Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
                "Content-Language", "Content-ID", "From", "To", "Subject", "Date", "Cc",
                "Reply-To", "Message-ID", "content-type", "X-Junk"]
VALUES = ["multipart/mixed; boundary=b", "multipart/alternative; boundary=\"b\"",
          "multipart/digest; boundary=bb", "message/rfc822", "text/plain; charset=utf-8",
          "text/html; charset*0*=us-ascii'en'a; charset*1=b", "application/x; name=\"a\\\"b\"",
          "base64", "quoted-printable", "attachment; filename=\"x\"", "(comment) text/plain",
          "A <a@b>, (c) \"q\" <d@e>, group: f@g;", "=?utf-8?q?x?=", "", ";;;", "multipart/",
          "\"unclosed", "(((", "<@route,@r2:x@y>", "@", "\u00e9t\u00e9"]


@st.composite
def mime_messages(draw: st.DrawFn) -> bytes:
    """Messages made of header fields, boundaries (right, wrong and reused) and bodies, with
    random line ends: the shapes that reach the splitter's corner cases."""
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.integers(0, 5))
        if kind <= 1:
            lines.append(f"{draw(st.sampled_from(HEADER_NAMES))}: {draw(st.sampled_from(VALUES))}")
        elif kind == 2:
            lines.append("--" + draw(st.sampled_from(["b", "bb", "b--", "bb--", "x", ""])))
        elif kind == 3:
            lines.append("")
        elif kind == 4:
            lines.append(" " + draw(st.sampled_from(VALUES)))  # a folded line
        else:
            lines.append(draw(st.text(max_size=20)))
    ends = draw(st.lists(st.sampled_from(["\r\n", "\n", "\r", ""]), min_size=len(lines),
                         max_size=len(lines)))
    return "".join(line + end for line, end in zip(lines, ends, strict=True)).encode(
        "utf-8", "surrogateescape")


def balanced(data: bytes) -> bool:
    """Whether the parentheses outside quoted strings and literals balance."""
    depth, i = 0, 0
    while i < len(data):
        c = data[i:i + 1]
        if c == b'"':
            i += 1
            while data[i:i + 1] != b'"':
                i += 2 if data[i:i + 1] == b"\\" else 1
        elif c == b"{":
            m = re.match(rb"\{(\d+)\}\r\n", data[i:])
            assert m, data[i:i + 20]
            i += m.end() + int(m.group(1)) - 1
        elif c == b"(":
            depth += 1
        elif c == b")":
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0


def walk_everything(raw: bytes) -> None:
    envelope, bodystructure, body = structure.imap_structure(raw)
    for data in (envelope, bodystructure, body):
        assert data.startswith(b"(") and balanced(data), data
    for part in ((), (1,), (1, 1), (2,), (1, 2, 3)):
        for what in ("", "MIME", "HEADER", "TEXT", "HEADER.FIELDS"):
            if what == "MIME" and not part:
                continue
            assert isinstance(structure.section(raw, part, what, ("from",)), bytes)
    for text_part in structure.text_parts(raw):
        assert isinstance(text_part.body, bytes)
    assert all(name == name.lower() for name, _ in structure.header_fields(raw))


@FUZZ
@given(mime_messages())
def test_the_walker_handles_any_mime_shaped_message(raw: bytes) -> None:
    walk_everything(raw)


@FUZZ
@given(st.binary(max_size=400))
def test_the_walker_handles_any_octets(raw: bytes) -> None:
    walk_everything(raw)


# --------------------------------------------------------------------------- adversarial nesting
def nested_multiparts(levels: int) -> bytes:
    parts = [b"Content-Type: multipart/mixed; boundary=b0x\r\n\r\n"]
    parts += [b"--b%dx\r\nContent-Type: multipart/mixed; boundary=b%dx\r\n\r\n" % (i - 1, i)
              for i in range(1, levels)]
    parts.append(b"--b%dx\r\n\r\nbottom\r\n" % (levels - 1))
    parts += [b"--b%dx--\r\n" % i for i in reversed(range(levels))]
    return b"".join(parts)


def nested_messages(levels: int) -> bytes:
    return b"Content-Type: message/rfc822\r\n\r\n" * levels + b"Subject: bottom\r\n\r\nx\r\n"


def many_parts(count: int) -> bytes:
    return (b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
            + b"--q\r\nContent-Type: text/plain\r\n\r\nx\r\n" * count + b"--q--\r\n")


def same_boundary(levels: int) -> bytes:
    return (b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
            + b"--q\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n" * levels)


@pytest.mark.parametrize(("name", "raw", "seconds"), [
    ("50,000 multipart levels", nested_multiparts(50_000), 5.0),
    ("50,000 message/rfc822 levels", nested_messages(50_000), 5.0),
    ("100,000 parts", many_parts(100_000), 10.0),
    ("50,000 levels reusing one boundary", same_boundary(50_000), 5.0),
    ("a 4 MB folded header", b"Subject: x\r\n" + b" folded\r\n" * 400_000 + b"\r\nx", 10.0),
    ("100,000 header fields", b"X: y\r\n" * 100_000 + b"\r\nx", 10.0),
    ("a 1 MB address list", b"To: " + b"a@b, " * 200_000 + b"\r\n\r\n", 10.0),
    ("deep comments", b"From: " + b"(" * 200_000 + b"\r\n\r\n", 5.0),
])
def test_adversarial_nesting_costs_bounded_time(name: str, raw: bytes, seconds: float) -> None:
    started = time.process_time()
    envelope, bodystructure, _ = structure.imap_structure(raw)
    structure.text_parts(raw)
    structure.section(raw, (1, 1, 1), "")
    elapsed = time.process_time() - started
    assert balanced(bodystructure) and balanced(envelope)
    assert elapsed < seconds, f"{name}: {elapsed:.1f} s"


def test_a_fetch_naming_sections_thousands_of_times_splits_the_message_once() -> None:
    raw = nested_multiparts(50_000) + b"X: y\r\n" * 1000
    sections = structure.Sections(raw)
    started = time.process_time()
    for _ in range(3000):  # what a 64 KB FETCH line of BODY.PEEK[1.1] items asks for
        sections.get((1, 1), "")
        sections.get((1,), "MIME")
        sections.get((), "HEADER.FIELDS", ("x",))
    elapsed = time.process_time() - started
    assert elapsed < 2.0, elapsed
    assert sections.get((), "") == raw
    assert sections.get((), "HEADER.FIELDS", ("content-type",)) == structure.section(
        raw, (), "HEADER.FIELDS", ("content-type",))
