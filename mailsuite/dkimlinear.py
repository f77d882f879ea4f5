"""What dkimpy does in quadratic time, done in linear time: parsing a message, and body
canonicalization (done once per message).

dkimpy's own parser (rfc822_parse) appends each continuation line to a bytes value, which is
quadratic in a long folded field (32 s of CPU for 8 MB, minutes for 20 MB), and raises on
lines that are no field. parse_message() splits the header section in one pass into dkimpy's
shape, for verifiers and signers to be handed instead of the raw message.

dkimpy strips trailing whitespace with re.sub(b"[\\t ]+\\r\\n", ...), which the regex engine
retries from every position of a whitespace run that is not followed by CRLF: one body line
of a megabyte of spaces costs minutes of CPU, for any message carrying a relaxed-body
signature (ours when signing too). The replacement gives the same bytes in linear time.

dkimpy also canonicalizes the whole body again for every signature and every ARC set it
checks (about a second for 25 MB, relaxed); inside `once_per_body()` each body is
canonicalized once per algorithm instead.

The canonicalization helpers are installed on import: dkimpy looks them up as module and
class attributes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import dkim.canonicalization

from mailsuite.mime import split_message

# A field name: printable US-ASCII except the colon (RFC 5322 2.2), then the optional
# whitespace that the obsolete syntax allows before the colon (RFC 5322 4.5).
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*\Z")

_local = threading.local()


@dataclass
class ParsedMessage:
    """A message split in one linear pass, header fields in dkimpy's shape: [name, value],
    the value as on the wire after the colon, continuation lines and final CRLF included."""

    fields: list[tuple[bytes, bytes]]
    names: list[bytes]  # each field's name, lower-cased, without trailing whitespace
    body: bytes
    defects: list[str] = field(default_factory=list)


def parse_message(raw: bytes) -> ParsedMessage:
    """Split `raw` into header fields and body; lines that are no field are defects, skipped."""
    head, body = split_message(raw)
    lines = head.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    pending: list[tuple[bytes, list[bytes]]] = []
    defects: list[str] = []
    for number, line in enumerate(lines, 1):
        if line[:1] in (b" ", b"\t"):
            if pending:
                pending[-1][1].append(line)
            else:
                defects.append("the header section starts with a continuation line")
            continue
        colon = line.find(b":")
        if colon <= 0 or _FIELD_NAME.match(line, 0, colon) is None:
            defects.append(f"header line {number} is not a header field")
            continue
        pending.append((line[:colon], [line[colon + 1:]]))
    fields = [(name, b"\r\n".join(parts) + b"\r\n") for name, parts in pending]
    names = [name.rstrip(b" \t").lower() for name, _ in fields]
    return ParsedMessage(fields, names, body, defects)


def strip_trailing_whitespace(content: bytes) -> bytes:
    """Remove the spaces and tabs that end each CRLF-terminated line."""
    lines = content.split(b"\r\n")
    # The last piece is not followed by CRLF: dkimpy leaves its trailing whitespace alone.
    return b"\r\n".join([line.rstrip(b" \t") for line in lines[:-1]] + lines[-1:])


@contextmanager
def once_per_body() -> Iterator[None]:
    """Within the block, this thread canonicalizes a given body object once per algorithm."""
    _local.cache = {}
    try:
        yield
    finally:
        _local.cache = None  # the cache holds whole bodies: never beyond one message


def _reusing(name: str, canonicalize: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    def canonicalize_body(body: bytes) -> bytes:
        cache = getattr(_local, "cache", None)
        if cache is None:
            return canonicalize(body)
        hit = cache.get((name, id(body)))
        if hit is None or hit[0] is not body:  # the entry holds the body: its id stays its
            hit = cache[(name, id(body))] = (body, canonicalize(body))
        return hit[1]

    return canonicalize_body


dkim.canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
for _algorithm in (dkim.canonicalization.Simple, dkim.canonicalization.Relaxed):
    _algorithm.canonicalize_body = staticmethod(  # type: ignore[method-assign]
        _reusing(_algorithm.name.decode(), _algorithm.canonicalize_body))
