"""What IMAP shows of a stored message's structure (RFC 3501): the ENVELOPE and the BODY and
BODYSTRUCTURE items (7.4.2), and the octets of each BODY[section] (6.4.5).

Everything is computed from the raw bytes as stored, by a small MIME splitter of our own rather
than the email package, because sizes, line counts and section octets have to be exact offsets
into what BODY[] gives the client. The splitter follows Dovecot's message parser, which clients
have long been tested against: one pass over the lines with a stack of the boundaries of the open
multiparts, bare LF accepted for CRLF, and nothing a sender can put in a message makes it raise.
Header values are given as they are written (unfolded): RFC 2047 encoded-words and RFC 2231
encodings are left for the client to decode, as RFC 3501 intends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

__all__ = ["SECTION_TEXTS", "Sections", "TextPart", "body_structure", "count_lines", "envelope",
           "header_fields", "imap_nstring", "imap_string", "section", "text_parts"]

NIL = b"NIL"

# Nesting deeper than this, or more parts than that, are not split any further (Dovecot's
# defaults are 100 and 10000): it bounds our recursion and the size of a BODYSTRUCTURE that a
# hostile message can make us write. No real message comes near either.
_MAX_DEPTH = 100
_MAX_PARTS = 10000

SECTION_TEXTS = frozenset({"", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})


# --- IMAP strings -------------------------------------------------------------------------------

def imap_string(value: bytes | str | None) -> bytes:
    """The value as an IMAP string (RFC 3501 4.3): NIL for None; a quoted string, with " and \\
    escaped, when it is 7-bit without CR or LF; otherwise a literal {n}CRLF<octets>. NUL octets
    are dropped, since no IMAP4rev1 string (not even a literal) may carry them."""
    if value is None:
        return NIL
    if isinstance(value, str):
        try:  # surrogateescape gives back the octets of a str decoded with it
            value = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace")
    if b"\0" in value:
        value = value.replace(b"\0", b"")
    if value.isascii() and b"\r" not in value and b"\n" not in value:
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(value) + value


def imap_nstring(value: bytes | str | None) -> bytes:
    """An nstring: NIL for None, else imap_string(value). (The same function, named for the
    grammar rule, so that callers say which one they mean.)"""
    return imap_string(value)


def count_lines(body: bytes) -> int:
    """The body-fld-lines of a body: its number of line ends (LF, so a bare LF counts too).

    Like Dovecot we count line ends, not lines: a last line without one is not counted. Inside
    a multipart that is what a part's last line looks like, since the CRLF in front of the
    boundary belongs to the boundary (RFC 2046 5.1.1)."""
    return body.count(b"\n")


# --- header fields ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Field:
    name: bytes  # lower-cased, without the colon; b"" for a line that is no field
    raw: bytes  # the whole field as stored: folded continuation lines and line ends included

    @property
    def value(self) -> bytes:
        """The unfolded value: the line breaks of folding removed, outer whitespace stripped."""
        _, _, value = self.raw.partition(b":")
        return value.replace(b"\r", b"").replace(b"\n", b"").strip()


# A line with its LF, or a last line without one. Only LF ends a line: a bare CR inside a value
# is the sender's business, not a line break.
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


def _header_fields(header: bytes) -> list[_Field]:
    """The fields of a header section in order, up to the blank line that ends it."""
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in _LINE.findall(header):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].append(line)
                continue
            name = b""
        else:
            name, colon, _ = line.partition(b":")
            name = name.strip().lower() if colon else b""
        fields.append((name, [line]))
    return [_Field(name, b"".join(lines)) for name, lines in fields]


# --- MIME header fields (RFC 2045, 2183, 2231, 3282, 2557) --------------------------------------

@dataclass
class _Mime:
    """A part's MIME header fields, parsed. The defaults are RFC 2045 5.2's: a part without a
    (usable) Content-Type is text/plain; charset=us-ascii."""

    type: bytes = b"TEXT"
    subtype: bytes = b"PLAIN"
    params: list[tuple[bytes, bytes]] = field(default_factory=lambda: [(b"CHARSET", b"US-ASCII")])
    id: bytes | None = None
    description: bytes | None = None
    encoding: bytes | None = None
    md5: bytes | None = None
    disposition: tuple[bytes, list[tuple[bytes, bytes]]] | None = None
    language: list[bytes] | None = None
    location: bytes | None = None


_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?=')
_PARAM_SECTION = re.compile(rb"(.+?)\*(\d{1,9})(\*?)", re.S)  # RFC 2231 name*N or name*N*


def _is_token(value: bytes) -> bool:
    # RFC 2045's token, except that 8-bit octets are let through (a literal carries them).
    return bool(value) and all(c > 0x20 and c != 0x7F and c not in _TSPECIALS for c in value)


def _leading_token(value: bytes) -> bytes:
    """The token a value starts with, ignoring what follows it: "plain charset=x", with its
    semicolon forgotten, is still text/plain, as Dovecot reads it."""
    value = value.strip()
    end = 0
    while end < len(value) and _is_token(value[end : end + 1]):
        end += 1
    return value[:end]


def _read_quoted(value: bytes, i: int) -> tuple[bytes, int]:
    """The content of the quoted string whose opening quote is at i, unescaped, and the offset
    after its closing quote (the end of value when the quote is never closed)."""
    out = bytearray()
    i += 1
    while i < len(value):
        c = value[i]
        if c == 0x5C and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
            continue
        if c == 0x22:
            return bytes(out), i + 1
        out.append(c)
        i += 1
    return bytes(out), len(value)


def _read_comment(value: bytes, i: int) -> tuple[bytes, int]:
    """The content of the (possibly nested) comment whose "(" is at i, and the offset after it."""
    out = bytearray()
    depth = 0
    while i < len(value):
        c = value[i]
        if c == 0x5C and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
            continue
        if c == 0x28:
            depth += 1
            if depth == 1:
                i += 1
                continue
        elif c == 0x29:
            depth -= 1
            if depth == 0:
                return bytes(out), i + 1
        out.append(c)
        i += 1
    return bytes(out), len(value)


def _split_structured(value: bytes, separator: bytes) -> list[bytes]:
    """A structured field value split at `separator` where it is outside quoted strings, with
    the (comments) that RFC 2045 5.1 allows between tokens left out. Quoted strings are kept as
    they are, quotes included."""
    segments: list[bytes] = []
    current = bytearray()
    i = 0
    while i < len(value):
        c = value[i : i + 1]
        if c == b'"':
            _, end = _read_quoted(value, i)
            current += value[i:end]
            i = end
        elif c == b"(":
            _, i = _read_comment(value, i)
        elif c == separator:
            segments.append(bytes(current))
            current = bytearray()
            i += 1
        else:
            current += c
            i += 1
    segments.append(bytes(current))
    return segments


def _params(segments: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The name=value parameters in the segments after a Content-Type or -Disposition value.
    Unquoted values are taken up to the ";" (senders write boundary=----=_Part unquoted); a
    segment without "=" is dropped, as the garbage it is."""
    params: list[tuple[bytes, bytes]] = []
    for segment in segments:
        name, equals, value = segment.partition(b"=")
        name, value = name.strip(), value.strip()
        if not equals or not name:
            continue
        if value.startswith(b'"'):
            value, _ = _read_quoted(value, 0)
        params.append((name, value))
    return _join_rfc2231_sections(params)


def _join_rfc2231_sections(params: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Parameters split into RFC 2231 3 sections (name*0, name*1, ...) joined back into one, at
    the place of the first. When the first section is encoded (name*0*) the result is named
    name* and stays encoded (charset'language'%XX...), for the client to decode, as Dovecot
    does; other parameters are left as they are."""
    sections: dict[bytes, dict[int, tuple[bytes, bool]]] = {}
    for name, value in params:
        match = _PARAM_SECTION.fullmatch(name)
        if match:
            pieces = sections.setdefault(match[1].lower(), {})
            pieces.setdefault(int(match[2]), (value, bool(match[3])))
    if not sections:
        return params
    joined: list[tuple[bytes, bytes]] = []
    done: set[bytes] = set()
    for name, value in params:
        match = _PARAM_SECTION.fullmatch(name)
        if not match:
            joined.append((name, value))
            continue
        key = match[1].lower()
        if key in done:
            continue
        done.add(key)
        pieces = sections[key]
        index = first = min(pieces)  # a missing section 0 is tolerated
        values = []
        while index in pieces:
            values.append(pieces[index][0])
            index += 1
        encoded = pieces[first][1]
        joined.append((match[1] + b"*" if encoded else match[1], b"".join(values)))
    return joined


def _param(params: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in params:
        if key.lower() == name:
            return value
    return None


def _content_type(value: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    """(type, subtype, parameters) of a Content-Type value, or None when it has no usable
    type/subtype, in which case RFC 2045 5.2 says to treat the part as having none."""
    segments = _split_structured(value, b";")
    main_type, slash, subtype = segments[0].partition(b"/")
    main_type, subtype = main_type.strip(), _leading_token(subtype)
    if not slash or not _is_token(main_type) or not subtype:
        return None
    return main_type, subtype, _params(segments[1:])


def _parse_mime(fields: list[_Field], in_digest: bool) -> _Mime:
    mime = _Mime()
    if in_digest:  # RFC 2046 5.1.5: a digest's parts default to message/rfc822
        mime.type, mime.subtype, mime.params = b"MESSAGE", b"RFC822", []
    seen: set[bytes] = set()
    for header_field in fields:
        name = header_field.name
        # The first of each field counts, as in Dovecot; repeating one is a sender's error.
        if not name.startswith(b"content-") or name in seen:
            continue
        seen.add(name)
        value = header_field.value
        if name == b"content-type":
            parsed = _content_type(value)
            if parsed is not None:
                mime.type, mime.subtype, mime.params = parsed
        elif name == b"content-transfer-encoding":
            words = _split_structured(value, b";")[0].split()
            mime.encoding = words[0] if words else None
        elif name == b"content-disposition":
            segments = _split_structured(value, b";")
            disposition = _leading_token(segments[0])
            if disposition:
                mime.disposition = (disposition, _params(segments[1:]))
        elif name == b"content-language":
            tags = [tag.strip() for tag in _split_structured(value, b",")]
            mime.language = [tag for tag in tags if tag] or None
        elif name == b"content-id":
            mime.id = value
        elif name == b"content-description":
            mime.description = value
        elif name == b"content-md5":
            mime.md5 = value
        elif name == b"content-location":
            mime.location = value
    return mime


# --- the MIME splitter --------------------------------------------------------------------------

_MULTIPART, _MESSAGE, _TEXT, _BASIC = "multipart", "message", "text", "basic"


def _kind(mime: _Mime) -> str:
    main_type = mime.type.lower()
    if main_type == b"multipart":
        return _MULTIPART
    if main_type == b"message" and mime.subtype.lower() == b"rfc822":
        return _MESSAGE
    return _TEXT if main_type == b"text" else _BASIC


@dataclass
class _Part:
    """One entity of the message: the message itself, a body part of a multipart, or the
    message encapsulated in a message/rfc822 part. Offsets are into the raw message."""

    start: int  # where its header starts; the header is raw[start:body_start]
    body_start: int  # where its body starts; the body is raw[body_start:end]
    end: int
    mime: _Mime
    kind: str
    children: list[_Part] = field(default_factory=list)  # a multipart's body parts
    message: _Part | None = None  # a message/rfc822 part's encapsulated message
    opaque: bool = False  # a multipart or message past the nesting caps, left unsplit


class _Stop(NamedTuple):
    """A boundary line that ends a body: its multipart's level on the boundary stack, whether it
    is the close delimiter, and where the line starts and ends (after its LF)."""

    level: int
    close: bool
    start: int
    end: int


class _Parser:
    """Splits a raw message into its _Part tree, in one pass like Dovecot's message parser, so
    that a boundary line ends every part nested inside its multipart, including ones whose own
    close delimiter is missing."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.boundaries: list[bytes] = []  # of the open multiparts, innermost last
        # The same, for _boundary_at: boundary -> its innermost level, and their lengths,
        # longest first, so a line costs a lookup per distinct length, not one per boundary.
        self._levels: dict[bytes, int] = {}
        self._lengths: list[int] = []
        self.parts = 0

    def message(self) -> _Part:
        part, _ = self._entity(0, in_digest=False, depth=0)
        return part

    def header_end(self, start: int) -> tuple[int, _Stop | None]:
        """Where the header starting at `start` ends: after the blank line that ends it, at the
        end of the data, or (in a broken part) at a boundary line; then also that boundary."""
        data = self.data
        pos = start
        while pos < len(data):
            stop = self._boundary_at(pos)
            if stop is not None:
                return self._before_line_break(pos, start), stop
            eol = data.find(b"\n", pos)
            if eol < 0:
                break
            if eol == pos or (eol == pos + 1 and data[pos] == 0x0D):
                return eol + 1, None
            pos = eol + 1
        return len(data), None

    def _entity(self, start: int, in_digest: bool, depth: int) -> tuple[_Part, _Stop | None]:
        """The entity whose header starts at `start`, and the boundary line that ends it (None
        when it runs to the end of the data)."""
        self.parts += 1
        body_start, stop = self.header_end(start)
        mime = _parse_mime(_header_fields(self.data[start:body_start]), in_digest)
        kind = _kind(mime)
        opaque = kind in (_MULTIPART, _MESSAGE) and (depth >= _MAX_DEPTH
                                                     or self.parts > _MAX_PARTS)
        if opaque:
            mime.type, mime.subtype, mime.params = b"APPLICATION", b"OCTET-STREAM", []
            kind = _BASIC
        part = _Part(start, body_start, body_start, mime, kind, opaque=opaque)
        if stop is not None:  # the header ran into a boundary: there is no body
            if kind == _MESSAGE:
                part.message = _Part(body_start, body_start, body_start, _Mime(), _TEXT)
            return part, stop
        if kind == _MESSAGE:
            part.message, stop = self._entity(body_start, in_digest=False, depth=depth + 1)
            part.end = part.message.end
            return part, stop
        boundary = _param(mime.params, b"boundary") if kind == _MULTIPART else None
        if boundary:
            return self._multipart(part, boundary, depth)
        # A leaf, or a multipart without a boundary (which can have no parts): the body runs to
        # the next boundary of an enclosing multipart.
        stop = self._next_boundary(body_start)
        part.end = self._body_end(part, stop)
        return part, stop

    def _multipart(self, part: _Part, boundary: bytes, depth: int) -> tuple[_Part, _Stop | None]:
        level = len(self.boundaries)
        self.boundaries.append(boundary)
        self._index_boundaries()
        in_digest = part.mime.subtype.lower() == b"digest"
        stop = self._next_boundary(part.body_start)  # the preamble is skipped
        while stop is not None and stop.level == level and not stop.close:
            if self.parts >= _MAX_PARTS:  # past the limit the parts are skipped over, unshown
                stop = self._next_boundary(stop.end)
                continue
            child, stop = self._entity(stop.end, in_digest, depth + 1)
            part.children.append(child)
        # Our boundary closes now; so do those of parts nested in ours that never closed.
        del self.boundaries[level:]
        self._index_boundaries()
        if stop is not None and stop.level == level:
            # Our close delimiter: the epilogue after it runs to an enclosing boundary, if any.
            stop = self._next_boundary(stop.end)
        part.end = self._body_end(part, stop)
        return part, stop

    def _boundary_at(self, pos: int) -> _Stop | None:
        """The boundary line starting at pos, if it is one: "--" and the boundary of an open
        multipart. Like Dovecot we only require the line to start so (RFC 2046 allows trailing
        whitespace; senders add worse); the longest matching boundary wins, and of equal ones
        the innermost, so nested parts that reuse or extend a boundary still split right."""
        data = self.data
        if not self.boundaries or not data.startswith(b"--", pos):
            return None
        for length in self._lengths:
            best = self._levels.get(data[pos + 2 : pos + 2 + length], -1)
            if best >= 0:
                break
        else:
            return None
        close = data.startswith(b"--", pos + 2 + len(self.boundaries[best]))
        eol = data.find(b"\n", pos)
        return _Stop(best, close, pos, len(data) if eol < 0 else eol + 1)

    def _index_boundaries(self) -> None:
        self._levels = {boundary: level for level, boundary in enumerate(self.boundaries)}
        self._lengths = sorted({len(boundary) for boundary in self.boundaries}, reverse=True)

    def _next_boundary(self, pos: int) -> _Stop | None:
        """The first boundary line at or after pos, which is at the start of a line."""
        if not self.boundaries:
            return None
        data = self.data
        while pos < len(data):
            stop = self._boundary_at(pos)
            if stop is not None:
                return stop
            eol = data.find(b"\n--", pos)
            if eol < 0:
                return None
            pos = eol + 1
        return None

    def _body_end(self, part: _Part, stop: _Stop | None) -> int:
        if stop is None:
            return len(self.data)
        return self._before_line_break(stop.start, part.body_start)

    def _before_line_break(self, pos: int, floor: int) -> int:
        """pos moved back over the line break in front of it, but not below floor: the CRLF
        before a boundary is part of the boundary (RFC 2046 5.1.1), not of the body before."""
        data = self.data
        if pos > floor and data[pos - 1] == 0x0A:
            pos -= 1
            if pos > floor and data[pos - 1] == 0x0D:
                pos -= 1
        return pos


def _parse(raw: bytes) -> _Part:
    if len(raw) > _CACHED_SIZE:
        return _Parser(raw).message()
    return _parse_cached(raw)


# A FETCH asks for several items of one message in a row (BODYSTRUCTURE, BODY, BODY[1], ...): a
# small cache spares parsing it again for each. It only keeps small messages, so that it never
# holds on to much memory; big ones are mostly attachment, which the parser skips over quickly.
# The trees are never modified once built, so sharing them between threads is safe.
_CACHED_SIZE = 1 << 20


@lru_cache(maxsize=8)
def _parse_cached(raw: bytes) -> _Part:
    return _Parser(raw).message()


def _as_bytes(raw: bytes) -> bytes:
    return raw if type(raw) is bytes else bytes(raw)


# --- ENVELOPE -----------------------------------------------------------------------------------

def envelope(raw: bytes) -> bytes:
    """The ENVELOPE of a message (RFC 3501 7.4.2), as it follows "ENVELOPE ":
    (date subject from sender reply-to to cc bcc in-reply-to message-id)."""
    raw = _as_bytes(raw)
    header_end, _ = _Parser(raw).header_end(0)
    return _envelope(_header_fields(raw[:header_end]))


def _envelope(fields: list[_Field]) -> bytes:
    first: dict[bytes, _Field] = {}
    for header_field in fields:
        first.setdefault(header_field.name, header_field)

    def text(name: bytes) -> bytes:
        found = first.get(name)
        return imap_nstring(None if found is None else found.value)

    def addresses(name: bytes) -> bytes | None:
        found = first.get(name)
        return None if found is None else _address_list(found.value)

    sender = addresses(b"from")
    return b"(" + b" ".join([
        text(b"date"),
        text(b"subject"),
        sender or NIL,
        # RFC 3501: a Sender or Reply-To that is absent or empty is given as From.
        addresses(b"sender") or sender or NIL,
        addresses(b"reply-to") or sender or NIL,
        addresses(b"to") or NIL,
        addresses(b"cc") or NIL,
        addresses(b"bcc") or NIL,
        text(b"in-reply-to"),
        text(b"message-id"),
    ]) + b")"


class _Token(NamedTuple):
    kind: str  # "word" (atom or quoted string), "literal", "end", or the special character
    text: bytes  # a quoted string's content unescaped; a domain literal with its brackets
    space: bool  # whitespace or a comment came before it
    comment: bytes | None  # the last (comment) right before it


_ADDRESS_SPECIALS = b"<>@,;:."
_ATOM_END = re.compile(rb'[\s()<>@,;:."\[]')


def _address_tokens(value: bytes) -> list[_Token]:
    """RFC 5322 3.2 lexical tokens of an address field, ending with an "end" token."""
    tokens: list[_Token] = []
    space = False
    comment: bytes | None = None
    i = 0
    while i < len(value):
        char = value[i : i + 1]
        if char.isspace():
            space = True
            i += 1
            continue
        if char == b"(":
            comment, i = _read_comment(value, i)
            space = True
            continue
        if char == b'"':
            text, i = _read_quoted(value, i)
            tokens.append(_Token("word", text, space, comment))
        elif char == b"[":
            close = value.find(b"]", i)
            end = len(value) if close < 0 else close + 1
            tokens.append(_Token("literal", value[i:end], space, comment))
            i = end
        elif char in _ADDRESS_SPECIALS:
            tokens.append(_Token(char.decode(), char, space, comment))
            i += 1
        else:
            match = _ATOM_END.search(value, i + 1)
            end = len(value) if match is None else match.start()
            tokens.append(_Token("word", value[i:end], space, comment))
            i = end
        space, comment = False, None
    tokens.append(_Token("end", b"", space, comment))
    return tokens


def _address(name: bytes | None, adl: bytes | None, mailbox: bytes | None,
             host: bytes | None) -> bytes:
    return b"(" + b" ".join(imap_nstring(item) for item in (name, adl, mailbox, host)) + b")"


_GROUP_END = _address(None, None, None, None)


def _address_list(value: bytes) -> bytes | None:
    """A field's addresses as an IMAP list of addresses, or None when it holds none."""
    addresses = _AddressParser(value).parse()
    return b"(" + b"".join(addresses) + b")" if addresses else None


class _AddressParser:
    """A lenient RFC 5322 3.4 address-list parser with Dovecot's results: groups become
    (NIL NIL "name" NIL) ... (NIL NIL NIL NIL) (RFC 3501 7.4.2), a missing mailbox or domain
    becomes MISSING_MAILBOX or MISSING_DOMAIN (a NIL host would announce a group), and garbage
    between addresses is skipped."""

    def __init__(self, value: bytes) -> None:
        self.tokens = _address_tokens(value)
        self.i = 0
        self.out: list[bytes] = []

    def parse(self) -> list[bytes]:
        while self._kind() != "end":
            if self._kind() == ",":
                self.i += 1
                continue
            phrase_end = self._phrase_end(self.i)
            if phrase_end > self.i and self.tokens[phrase_end].kind == ":":
                self._group(phrase_end)
            else:
                self._mailbox(in_group=False)
        return self.out

    def _kind(self) -> str:
        return self.tokens[self.i].kind

    def _phrase_end(self, i: int) -> int:
        while self.tokens[i].kind in ("word", "."):  # "." for obs-phrase: John Q. Public
            i += 1
        return i

    def _phrase(self, start: int, end: int) -> bytes:
        out = bytearray()
        for token in self.tokens[start:end]:
            if out and token.space:
                out += b" "
            out += token.text
        return bytes(out)

    def _group(self, colon: int) -> None:
        self.out.append(_address(None, None, self._phrase(self.i, colon), None))
        self.i = colon + 1
        while self._kind() not in ("end", ";"):
            if self._kind() == ",":
                self.i += 1
                continue
            self._mailbox(in_group=True)
        if self._kind() == ";":
            self.i += 1
        self.out.append(_GROUP_END)

    def _mailbox(self, in_group: bool) -> None:
        ends = (",", ";", "end") if in_group else (",", "end")
        start = self.i
        phrase_end = self._phrase_end(start)
        name = adl = None
        if self.tokens[phrase_end].kind == "<":  # name-addr: [display-name] <[route:]addr>
            name = self._phrase(start, phrase_end) or None
            self.i = phrase_end + 1
            adl = self._route()
            mailbox, host = self._addr_spec()
            while self._kind() not in (">", *ends):
                self.i += 1
            if self._kind() == ">":
                self.i += 1
            angle = True
        else:
            mailbox, host = self._addr_spec()
            angle = False
        while self._kind() not in ends:  # whatever garbage is left of this address
            self.i += 1
        if not angle:
            if mailbox is None and host is None:
                return
            # "addr@host (Name)": the comment is the only name there is (Dovecot does so too).
            comments = [t.comment for t in self.tokens[start + 1 : self.i + 1] if t.comment]
            name = comments[-1] if comments else None
        self.out.append(_address(name, adl, mailbox or b"MISSING_MAILBOX",
                                 host or b"MISSING_DOMAIN"))

    def _route(self) -> bytes | None:
        """The obsolete source route of <@a,@b:addr> as "@a,@b" (the addr-adl)."""
        if self._kind() != "@":
            return None
        hops = []
        while self._kind() == "@":
            self.i += 1
            hops.append(b"@" + (self._dotted(("word", "literal")) or b""))
            while self._kind() == ",":
                self.i += 1
        if self._kind() == ":":
            self.i += 1
        return b",".join(hops)

    def _addr_spec(self) -> tuple[bytes | None, bytes | None]:
        local = self._dotted(("word",))
        host = None
        if self._kind() == "@":
            self.i += 1
            host = self._dotted(("word", "literal"))
        return local, host

    def _dotted(self, kinds: tuple[str, ...]) -> bytes | None:
        """Words joined by dots (a dot-atom, or obs-local-part with quoted words, given
        unquoted as Dovecot gives them), up to a word that follows a word without a dot."""
        out = bytearray()
        previous = None
        while True:
            token = self.tokens[self.i]
            if token.kind == ".":
                out += b"."
            elif token.kind in kinds and previous in (None, "."):
                out += token.text
            else:
                break
            previous = token.kind
            self.i += 1
        return bytes(out) or None


# --- BODY and BODYSTRUCTURE ---------------------------------------------------------------------

def body_structure(raw: bytes, extensible: bool = True) -> bytes:
    """BODYSTRUCTURE (extensible) or BODY (not) of a message, per RFC 3501 7.4.2, as it follows
    "BODYSTRUCTURE " or "BODY ". It may contain literals."""
    raw = _as_bytes(raw)
    return _write_body(_parse(raw), raw, extensible)


def _write_body(part: _Part, raw: bytes, extensible: bool) -> bytes:
    mime = part.mime
    if part.kind == _MULTIPART:
        # RFC 3501's body-type-mpart wants at least one part: for a multipart without any we
        # give an empty text/plain, as Dovecot does.
        children = part.children or [_Part(part.body_start, part.body_start, part.body_start,
                                            _Mime(), _TEXT)]
        out = b"".join(_write_body(child, raw, extensible) for child in children)
        out += b" " + imap_string(mime.subtype)
        if extensible:
            out += b" " + b" ".join(
                [_write_params(mime.params), *_write_extension_tail(mime)])
        return b"(" + out + b")"

    body = raw[part.body_start : part.end]
    params = mime.params
    if part.kind == _TEXT and _param(params, b"charset") is None:
        # RFC 2046 4.1.2: text without a charset is us-ascii; say so, as Dovecot does.
        params = [*params, (b"CHARSET", b"US-ASCII")]
    fields = [
        imap_string(mime.type),
        imap_string(mime.subtype),
        _write_params(params),
        imap_nstring(mime.id),
        imap_nstring(mime.description),
        imap_string(mime.encoding or b"7BIT"),
        b"%d" % len(body),
    ]
    if part.kind == _TEXT:
        fields.append(b"%d" % count_lines(body))
    elif part.kind == _MESSAGE and part.message is not None:
        inner = part.message
        fields.append(_envelope(_header_fields(raw[inner.start : inner.body_start])))
        fields.append(_write_body(inner, raw, extensible))
        fields.append(b"%d" % count_lines(body))
    if extensible:
        fields.append(imap_nstring(mime.md5))
        fields.extend(_write_extension_tail(mime))
    return b"(" + b" ".join(fields) + b")"


def _write_params(params: list[tuple[bytes, bytes]]) -> bytes:
    if not params:
        return NIL
    return b"(" + b" ".join(imap_string(name) + b" " + imap_string(value)
                            for name, value in params) + b")"


def _write_extension_tail(mime: _Mime) -> list[bytes]:
    """body-fld-dsp, body-fld-lang and body-fld-loc, the same for single parts and multiparts."""
    if mime.disposition is None:
        disposition = NIL
    else:
        kind, params = mime.disposition
        disposition = b"(" + imap_string(kind) + b" " + _write_params(params) + b")"
    if mime.language is None:
        language = NIL
    else:
        language = b"(" + b" ".join(imap_string(tag) for tag in mime.language) + b")"
    return [disposition, language, imap_nstring(mime.location)]


# --- BODY[section] ------------------------------------------------------------------------------

def section(raw: bytes, part: tuple[int, ...], what: str, fields: tuple[str, ...] = ()) -> bytes:
    """The octets of BODY[<part>.<what>] (RFC 3501 6.4.5); b"" for a part that does not exist.

    part=() is the message itself, (1, 2) is part 1.2. what is "" (the part's body, or for
    part=() the whole message), "MIME" (a part's own MIME header), or "HEADER", "HEADER.FIELDS",
    "HEADER.FIELDS.NOT" or "TEXT" of the message itself or of the message a message/rfc822 part
    encapsulates (b"" for any other part). HEADER.FIELDS gives the fields named in `fields`
    (case-insensitively, folded lines kept, in message order) and a blank line; .NOT the others.
    """
    return Sections(raw).get(part, what, fields)


class Sections:
    """The sections of one message, for a FETCH that asks for several: the message is split
    at most once (and only if a section needs it), and each header's fields are read once, so
    a command naming the same section thousands of times costs one parse, not thousands."""

    def __init__(self, raw: bytes) -> None:
        self.raw = _as_bytes(raw)
        self._tree: _Part | None = None
        self._fields: dict[int, list[_Field]] = {}  # header start -> its fields

    def get(self, part: tuple[int, ...], what: str, fields: tuple[str, ...] = ()) -> bytes:
        """section() of this message."""
        what = what.upper()
        if what not in SECTION_TEXTS:
            raise ValueError(f"not a section text: {what!r}")
        raw = self.raw
        if not part and what in ("", "MIME"):  # only a part has a MIME header of its own
            return raw if what == "" else b""
        if self._tree is None:
            self._tree = _parse(raw)
        node: _Part | None = self._tree
        if part:
            node = _find_part(self._tree, part)
            if node is None:
                return b""
            if what == "":
                return raw[node.body_start : node.end]
            if what == "MIME":
                return raw[node.start : node.body_start]
            node = node.message  # HEADER and TEXT are those of an encapsulated message
            if node is None:
                return b""
        assert node is not None
        if what == "HEADER":
            return raw[node.start : node.body_start]
        if what == "TEXT":
            return raw[node.body_start : node.end]
        if node.start not in self._fields:
            self._fields[node.start] = _header_fields(raw[node.start : node.body_start])
        wanted = {(name.encode("utf-8") if isinstance(name, str) else name).lower()
                  for name in fields}
        negate = what == "HEADER.FIELDS.NOT"
        kept = [header_field.raw if header_field.raw.endswith(b"\n")
                else header_field.raw + b"\r\n"
                for header_field in self._fields[node.start]
                if (header_field.name in wanted) != negate]
        return b"".join(kept) + b"\r\n"


def _find_part(root: _Part, numbers: tuple[int, ...]) -> _Part | None:
    """The part numbered `numbers` (RFC 3501 6.4.5): a multipart's parts count from 1; a message
    (the top one or an encapsulated one) that is no multipart has just part 1, its body; and a
    number after a message/rfc822 part's numbers is a part of the message it encapsulates."""
    node = root
    is_message = True
    for position, number in enumerate(numbers):
        if node.kind == _MULTIPART:
            if not 1 <= number <= len(node.children):
                return None
            node = node.children[number - 1]
        elif not (is_message and number == 1):
            return None
        is_message = False
        if position + 1 < len(numbers) and node.message is not None:
            node, is_message = node.message, True
    return node


# --- for SEARCH -------------------------------------------------------------------------------

def header_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-cased name, unfolded value) of each field of the message's own header, in order;
    lines that are no field are left out."""
    raw = _as_bytes(raw)
    header_end, _ = _Parser(raw).header_end(0)
    return [(f.name, f.value) for f in _header_fields(raw[:header_end]) if f.name]


class TextPart(NamedTuple):
    """A text/* leaf: its charset parameter (None when absent), its Content-Transfer-Encoding
    (None when absent) and its body octets as stored (still transfer-encoded)."""

    charset: bytes | None
    encoding: bytes | None
    body: bytes


def text_parts(raw: bytes) -> list[TextPart]:
    """The text/* leaves of a message in order, those of attached messages (message/rfc822)
    included, and the multiparts nested past the caps, whose text is in there unsplit (as
    octets of no declared charset or encoding). The tree is walked with an explicit stack, and
    the splitter already caps its nesting, so no message can make this recurse deeply."""
    raw = _as_bytes(raw)
    out: list[TextPart] = []
    stack = [_parse(raw)]
    while stack:
        node = stack.pop()
        if node.kind == _MULTIPART:
            stack.extend(reversed(node.children))
        elif node.kind == _MESSAGE:
            if node.message is not None:
                stack.append(node.message)
        elif node.kind == _TEXT:
            out.append(TextPart(_param(node.mime.params, b"charset"), node.mime.encoding,
                                raw[node.body_start : node.end]))
        elif node.opaque:
            out.append(TextPart(None, None, raw[node.body_start : node.end]))
    return out


def imap_structure(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(ENVELOPE, BODYSTRUCTURE, BODY) of a message, as the store keeps them from ingest on."""
    raw = _as_bytes(raw)
    tree = _parse(raw)  # once for both: a big message is not in the parse cache
    return envelope(raw), _write_body(tree, raw, True), _write_body(tree, raw, False)
