"""Raw RFC 5322 message handling that keeps the bytes exact.

Header fields are found and removed on the raw bytes (never re-serialised through the
email package), so that everything we do not touch stays byte-for-byte what the sender sent,
which DKIM signatures over it depend on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class HeaderField:
    name: str  # as written, without the colon
    raw: bytes  # the whole field including folded continuation lines and the final CRLF

    @property
    def value(self) -> str:
        """Unfolded value, decoded leniently (UTF-8 headers are legal under RFC 6532)."""
        _, _, value = self.raw.partition(b":")
        return value.replace(b"\r\n", b"").decode("utf-8", "replace").strip()


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """(header section including its final CRLF, body after the blank line)."""
    if raw.startswith(b"\r\n"):
        return b"", raw[2:]
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return raw, b""
    return raw[: end + 2], raw[end + 4:]


def header_fields(header: bytes) -> Iterator[HeaderField]:
    """The fields of a header section, in order; a line that is no field is kept as one."""
    lines = header.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    current: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
            continue
        if current:
            yield _field(current)
        current = [line]
    if current:
        yield _field(current)


def _field(lines: list[bytes]) -> HeaderField:
    raw = b"\r\n".join(lines) + b"\r\n"
    name = lines[0].split(b":", 1)[0].strip().decode("ascii", "replace") if b":" in lines[0] else ""
    return HeaderField(name, raw)


def remove_fields(raw: bytes, drop: Callable[[HeaderField], bool]) -> bytes:
    """The message with every header field for which drop() is true removed."""
    header, body = split_message(raw)
    fields = list(header_fields(header))
    kept = [f.raw for f in fields if not drop(f)]
    if len(kept) == len(fields):
        return raw
    return b"".join(kept) + b"\r\n" + body


def count_fields(raw: bytes, name: str) -> int:
    """How many fields called `name` the header has (a field starts a line; folds don't).

    Counted with one regular expression rather than by splitting every field: this runs on
    every message the MX takes. Whitespace before the colon (RFC 5322 obsolete syntax) counts.
    """
    header, _ = split_message(raw)
    pattern = re.compile(rb"(?:^|\r\n)" + re.escape(name.encode("ascii")) + rb"[ \t]*:", re.I)
    return len(pattern.findall(header))


def has_field(raw: bytes, name: str) -> bool:
    return count_fields(raw, name) > 0


# A field starts with its name, printable ASCII but the colon, and the colon (RFC 5322 2.2).
# Whitespace before the colon (4.5.3 obsolete syntax) is refused too: the parsers after us
# (dkimpy's among them) disagree about such a field, and disagreement is how header
# smuggling works; a permanent refusal tells the sender at once.
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")


@dataclass(frozen=True)
class HeaderLimits:
    max_field_size: int  # one field, folded lines and CRLFs included
    max_section_size: int  # the whole header section
    max_fields: int


class HeaderViolation(ValueError):
    """The header section breaks a limit (kind "size") or the syntax (kind "syntax")."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class HeaderChecker:
    """Checks a message's header section while it streams in.

    feed() takes the message in pieces of any size; the checker keeps at most one
    incomplete line (never more than max_field_size octets), looks at each octet once, and
    stops at the blank line that ends the header section. With dot_stuffed, the pieces are
    SMTP DATA as sent (RFC 5321 4.5.2) and a line's leading dot is taken off first.
    """

    def __init__(self, limits: HeaderLimits, dot_stuffed: bool = False) -> None:
        self._limits = limits
        self._stuffed = dot_stuffed
        self._partial = bytearray()
        self._field_size = 0
        self._section_size = 0
        self.fields = 0
        self.done = False  # the blank line was seen
        self.violation: HeaderViolation | None = None

    @property
    def finished(self) -> bool:
        return self.done or self.violation is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.finished:
            return
        buf = self._partial
        scan = max(0, len(buf) - 1)  # a CR at the end may pair with an LF in `data`
        buf += data
        start = 0
        while not self.finished:
            end = buf.find(b"\r\n", scan)
            if end < 0:
                break
            self._line(buf, start, end)
            start = scan = end + 2
        del buf[:start]
        if not self.finished and len(buf) > 2:  # a lone CR may yet be the blank line
            # The incomplete line counts already: a field must not grow unseen.
            first = buf[1:2] if self._stuffed and buf[:1] == b"." else buf[:1]
            folded = first in (b" ", b"\t") and self.fields > 0
            self._check(len(buf) + (self._field_size if folded else 0),
                        self._section_size + len(buf))
        if self.finished:
            buf.clear()

    def _line(self, buf: bytearray, start: int, end: int) -> None:
        if self._stuffed and buf[start:start + 1] == b".":
            start += 1
        if start == end:
            self.done = True
            return
        size = end - start + 2
        if buf[start] in b" \t":
            if self.fields == 0:
                self._fail("syntax", "first header line starts with white space")
                return
            self._field_size += size
        else:
            match = _FIELD_START.match(buf, start, end)
            if match is None:
                self._fail("syntax", _malformed_reason(bytes(buf[start:min(end, start + 200)])))
                return
            self.fields += 1
            self._field_size = size
            if self.fields > self._limits.max_fields:
                self._fail("size", f"more than {self._limits.max_fields} header fields")
                return
        self._section_size += size
        self._check(self._field_size, self._section_size)

    def _check(self, field_size: int, section_size: int) -> None:
        if field_size > self._limits.max_field_size:
            self._fail("size", f"a header field is longer than {self._limits.max_field_size}"
                               " octets")
        elif section_size > self._limits.max_section_size:
            self._fail("size", f"the header is longer than {self._limits.max_section_size}"
                               " octets")

    def _fail(self, kind: str, text: str) -> None:
        self.violation = HeaderViolation(kind, text)


def _malformed_reason(line: bytes) -> str:
    """Why a header line that should start a field does not (a short, printable reason)."""
    name, colon, _ = line.partition(b":")
    if not colon:
        return "header line without a colon"
    if not name:
        return "header field with an empty name"
    if any(byte > 0x7e for byte in name):
        return "8-bit octet in a header field name"
    inner = name.rstrip(b" \t")
    if b" " in inner or b"\t" in inner:
        return "white space in a header field name"
    if inner != name:
        return "white space before the colon of a header field"
    return "control character in a header field name"
