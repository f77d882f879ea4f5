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
