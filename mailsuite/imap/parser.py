"""The IMAP4rev1 command grammar (RFC 3501 9) with LITERAL+ (RFC 7888) and literal8 (RFC 3516).

The server reads a command as alternating pieces: a line (without its CRLF) that ends in a
literal marker ``{n}``/``{n+}``, the n literal octets, the next line, and so on, the last
piece always being a line. ``literal_at_end`` tells it, line by line, whether n octets follow;
``parse_command`` then turns the pieces into a ``Command``.

Tokens are generic (the tokenizer does not know each command's grammar):

``Atom``
    Any bare word: atoms, astrings written as atoms, numbers, sequence sets (``1:*``), flags
    (``\\Seen``), LIST patterns (``%``, ``*``) and ``NIL``. ``NIL`` is deliberately *not* a
    token of its own: an atom NIL is also a legal astring (a mailbox named NIL), and only the
    command's grammar knows which is meant, so ``nstring()``/``is_nil()`` decide in context.
    Atom text is kept as sent; the helpers below validate it for the role it plays.
``QuotedString`` / ``LiteralString``
    The string's octets, unescaped. Literal payloads are passed through untouched (a NUL
    check for APPEND belongs to that command).
``ParenList``
    A parenthesised list, nested at most ``MAX_DEPTH`` deep.
``FetchAtt``
    A bare word that starts with BODY[, BODY.PEEK[, BINARY[, BINARY.PEEK[ or BINARY.SIZE[
    (case-insensitively), parsed and validated as a whole, spaces and header list included:
    ``BODY.PEEK[HEADER.FIELDS (DATE FROM)]<0.100>``. A bare word starting like that can
    therefore not be used as a mailbox name; such names must be quoted, as RFC 3501 allows.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

from mailsuite.imap.utf7 import decode_mailbox

__all__ = [
    "MAX_DEPTH", "MAX_NUMBER", "ParseError", "MailboxNameError", "Atom", "QuotedString",
    "LiteralString", "ParenList", "FetchAtt", "Token", "Command", "SequenceSet", "literal_at_end",
    "parse_command", "keyword", "is_nil", "number", "nz_number", "astring", "nstring",
    "list_mailbox", "mailbox_name", "list_pattern", "parse_sequence_set", "parse_flag",
    "parse_flag_list", "parse_date", "parse_datetime", "mailbox_pattern", "quote",
]

MAX_DEPTH = 32  # nested parenthesised lists; deeper input is an attack, not a client
MAX_NUMBER = 2**32 - 1  # RFC 3501 9: number is an unsigned 32-bit integer
_MAX_DIGITS = 10  # len(str(MAX_NUMBER)); longer digit strings are rejected before int()


class ParseError(ValueError):
    """Input that does not follow the grammar; the server answers BAD.

    ``tag`` is the command's tag when it could be read (so the answer can be tagged), else None.
    """

    def __init__(self, message: str, tag: str | None = None) -> None:
        super().__init__(message)
        self.tag = tag


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Atom:
    value: str  # as sent (ASCII), not case-folded

    def upper(self) -> str:
        return self.value.upper()


@dataclass(frozen=True)
class QuotedString:
    value: bytes  # without the quotes, escapes resolved


@dataclass(frozen=True)
class LiteralString:
    value: bytes
    binary: bool = False  # literal8 (~{n}, RFC 3516): may hold NUL octets


@dataclass(frozen=True)
class ParenList:
    items: list[Token] = field(default_factory=list)


@dataclass(frozen=True)
class FetchAtt:
    """A FETCH attribute with a section: BODY[...], BODY.PEEK[...], BINARY[.PEEK|.SIZE][...].

    ``part`` is the section-part (``(1, 2)`` for ``1.2``), ``text`` one of HEADER,
    HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT, MIME or None, ``fields`` the header-list of
    HEADER.FIELDS[.NOT] as sent, ``partial`` (origin, length) from ``<origin.length>``.
    """

    name: str  # upper-cased: BODY, BODY.PEEK, BINARY, BINARY.PEEK, BINARY.SIZE
    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()
    partial: tuple[int, int] | None = None

    @property
    def peek(self) -> bool:
        return self.name.endswith(".PEEK")

    @property
    def section(self) -> str:
        """The text between the brackets in canonical form, as FETCH responses echo it."""
        spec = ".".join([str(n) for n in self.part] + ([self.text] if self.text else []))
        if self.fields:
            spec += " (" + " ".join(quote(f) for f in self.fields) + ")"
        return spec

    def __str__(self) -> str:
        tail = f"<{self.partial[0]}.{self.partial[1]}>" if self.partial else ""
        return f"{self.name}[{self.section}]{tail}"


Token = Atom | QuotedString | LiteralString | ParenList | FetchAtt


@dataclass(frozen=True)
class Command:
    tag: str
    name: str  # upper-cased; "UID FETCH" etc. for the UID forms
    args: list[Token]


# --------------------------------------------------------------------------- tokenizer

_SP = 0x20
_LPAREN, _RPAREN = 0x28, 0x29
_DQUOTE = 0x22
_LBRACE = 0x7B
_LBRACKET, _RBRACKET = 0x5B, 0x5D
_LT = 0x3C

# Tag: 1*<any ASTRING-CHAR except "+">.
_TAG_RE = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')
# A bare word up to the next separator; "[" is left out so fetch sections can be spotted.
_WORD_RE = re.compile(rb'[^\x00-\x20\x7f-\xff(){"\[]+')
# Possessive/atomic matching: a quoted string is scanned once, whatever its length.
_QUOTED_RE = re.compile(rb'"((?:[^"\\\r\n\x00]++|\\["\\])*+)"')
_UNESCAPE_RE = re.compile(rb'\\(["\\])')
_LITERAL_RE = re.compile(rb'~?\{([0-9]+)(\+?)\}')
_SECTION_SPEC_RE = re.compile(rb'[A-Za-z0-9.]*')
_PARTIAL_RE = re.compile(rb'<([0-9]{1,10})\.([0-9]{1,10})>')

_SECTION_NAMES = frozenset({"BODY", "BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"})
_MSGTEXT = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT"})


def literal_at_end(line: bytes) -> tuple[int, bool] | None:
    """(size, non-synchronizing) if the line ends in a literal marker {n}, {n+} (or ~{n}).

    Raises ParseError for a size of more than 10 digits or above 2**32-1, looking at the digits
    only, so a hostile size costs neither memory nor a big-integer conversion.
    """
    end = len(line)
    if end < 3 or line[end - 1] != 0x7D:  # "}"
        return None
    i = end - 2
    non_sync = line[i] == 0x2B  # "+"
    if non_sync:
        i -= 1
    last_digit = i
    while i >= 0 and 0x30 <= line[i] <= 0x39:
        i -= 1
    digits = last_digit - i
    if digits == 0 or i < 0 or line[i] != _LBRACE:
        return None  # e.g. an atom that merely ends in "}"
    if digits > _MAX_DIGITS:
        raise ParseError("literal size too large")
    size = int(line[i + 1:last_digit + 1])
    if size > MAX_NUMBER:
        raise ParseError("literal size too large")
    return size, non_sync


class _Reader:
    """A cursor over the pieces of one command: lines at even indices, literals at odd ones."""

    def __init__(self, parts: Sequence[bytes]) -> None:
        self.parts = parts
        self.index = 0
        self.line = parts[0]
        self.pos = 0

    def peek(self) -> int | None:
        return self.line[self.pos] if self.pos < len(self.line) else None

    def at_end(self) -> bool:
        return self.pos >= len(self.line) and self.index == len(self.parts) - 1

    def expect(self, byte: int, what: str) -> None:
        if self.peek() != byte:
            raise ParseError(f"expected {what} at offset {self.pos}")
        self.pos += 1

    def tag(self) -> str:
        m = _TAG_RE.match(self.line, self.pos)
        if not m:
            raise ParseError("missing or invalid tag")
        self.pos = m.end()
        if self.peek() != _SP:
            raise ParseError("missing or invalid tag")
        return m.group().decode("ascii")

    def command_name(self) -> str:
        token = self.word()
        if not isinstance(token, Atom) or not _is_atom(token.value):
            raise ParseError("invalid command name")
        return token.value.upper()

    def token(self, depth: int) -> Token:
        c = self.peek()
        if c == _LPAREN:
            return self.paren_list(depth + 1)
        if c == _DQUOTE:
            return self.quoted()
        if c == _LBRACE or (c == 0x7E and self.line[self.pos + 1:self.pos + 2] == b"{"):
            return self.literal()
        if c is None:
            raise ParseError(f"expected an argument at offset {self.pos}")
        return self.word()

    def paren_list(self, depth: int) -> ParenList:
        if depth > MAX_DEPTH:
            raise ParseError("parentheses nested too deeply")
        self.pos += 1
        items: list[Token] = []
        if self.peek() == _RPAREN:
            self.pos += 1
            return ParenList(items)
        while True:
            items.append(self.token(depth))
            c = self.peek()
            if c == _RPAREN:
                self.pos += 1
                return ParenList(items)
            self.expect(_SP, 'SP or ")"')

    def quoted(self) -> QuotedString:
        m = _QUOTED_RE.match(self.line, self.pos)
        if not m:
            raise ParseError(f"malformed quoted string at offset {self.pos}")
        self.pos = m.end()
        return QuotedString(_UNESCAPE_RE.sub(rb"\1", m.group(1)))

    def literal(self) -> LiteralString:
        m = _LITERAL_RE.match(self.line, self.pos)
        if not m:
            raise ParseError(f"malformed literal at offset {self.pos}")
        digits = m.group(1)
        if len(digits) > _MAX_DIGITS or int(digits) > MAX_NUMBER:
            raise ParseError("literal size too large")
        if m.end() != len(self.line) or self.index + 1 >= len(self.parts):
            raise ParseError("a literal marker must end its line")
        data = self.parts[self.index + 1]
        if len(data) != int(digits):
            raise ParseError("literal length does not match its marker")
        self.index += 2
        self.line = self.parts[self.index]
        self.pos = 0
        return LiteralString(bytes(data), binary=m.group().startswith(b"~"))

    def word(self) -> Atom | FetchAtt:
        start = self.pos
        end = self._word_run(start)
        while end < len(self.line) and self.line[end] == _LBRACKET:
            name = self.line[start:end].decode("ascii").upper()
            if name in _SECTION_NAMES:
                self.pos = end
                return self.fetch_att(name)
            # Otherwise "[" is an ordinary atom character (a mailbox such as "[Gmail]/Sent").
            end = self._word_run(end + 1)
        if end == start:
            raise ParseError(f"expected an argument at offset {start}")
        self._check_follower(end)
        self.pos = end
        return Atom(self.line[start:end].decode("ascii"))

    def _word_run(self, pos: int) -> int:
        m = _WORD_RE.match(self.line, pos)
        return m.end() if m else pos

    def _check_follower(self, pos: int) -> None:
        if pos < len(self.line):
            c = self.line[pos]
            if c < 0x20 or c >= 0x7F:
                raise ParseError(f"invalid octet 0x{c:02x} at offset {pos}")

    def fetch_att(self, name: str) -> FetchAtt:
        self.pos += 1  # "["
        m = _SECTION_SPEC_RE.match(self.line, self.pos)
        assert m is not None  # the pattern matches the empty string
        self.pos = m.end()
        part, text = _section_spec(m.group().decode("ascii").upper(), name)
        fields: tuple[str, ...] = ()
        if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            self.expect(_SP, f"SP and a header list after {text}")
            fields = self.header_list()
        self.expect(_RBRACKET, '"]" closing the section')
        partial = None
        if self.peek() == _LT:
            pm = _PARTIAL_RE.match(self.line, self.pos)
            if not pm or name == "BINARY.SIZE":
                raise ParseError(f"malformed partial range at offset {self.pos}")
            origin, length = int(pm.group(1)), int(pm.group(2))
            if origin > MAX_NUMBER or not 0 < length <= MAX_NUMBER:
                raise ParseError("partial range out of bounds")
            partial = (origin, length)
            self.pos = pm.end()
        c = self.peek()
        if c is not None and c not in (_SP, _RPAREN):
            raise ParseError(f"unexpected octet after {name}[...] at offset {self.pos}")
        return FetchAtt(name, part, text, fields, partial)

    def header_list(self) -> tuple[str, ...]:
        if self.peek() != _LPAREN:
            raise ParseError("expected a header list")
        self.pos += 1
        names: list[str] = []
        while True:
            if self.peek() == _LPAREN:
                raise ParseError("expected a header field name")
            names.append(_header_field_name(self.header_field()))
            if self.peek() == _RPAREN:
                self.pos += 1
                return tuple(names)
            self.expect(_SP, 'SP or ")" in the header list')


    def header_field(self) -> Token:
        """A header-fld-name: an astring, read without looking for a fetch section in it, so
        that BODY[HEADER.FIELDS (BODY[HEADER.FIELDS (... cannot nest."""
        c = self.peek()
        if c == _DQUOTE:
            return self.quoted()
        if c == _LBRACE:
            return self.literal()
        start = self.pos
        end = self._word_run(start)
        if end == start:
            raise ParseError(f"expected a header field name at offset {start}")
        self._check_follower(end)
        self.pos = end
        return Atom(self.line[start:end].decode("ascii"))


def _section_spec(spec: str, name: str) -> tuple[tuple[int, ...], str | None]:
    if spec == "":
        return (), None
    components = spec.split(".")
    if "" in components:
        raise ParseError(f"malformed section {spec!r}")
    part: list[int] = []
    for comp in components:
        if not comp.isdigit():
            break
        part.append(_nz_number_text(comp))
    rest = ".".join(components[len(part):])
    if not rest:
        return tuple(part), None
    if name.startswith("BINARY"):
        raise ParseError("BINARY sections are part numbers only (RFC 3516)")
    if rest in _MSGTEXT or (rest == "MIME" and part):
        return tuple(part), rest
    raise ParseError(f"unknown section {spec!r}")


def _header_field_name(token: Token) -> str:
    if isinstance(token, Atom):
        if not _is_astring_atom(token.value):
            raise ParseError(f"invalid header field name {token.value!r}")
        text = token.value
    elif isinstance(token, QuotedString | LiteralString):
        try:
            text = token.value.decode("ascii")
        except UnicodeDecodeError:
            raise ParseError("header field names are ASCII") from None
    else:
        raise ParseError("expected a header field name")
    # RFC 5322 2.2: printable US-ASCII except ":"; the empty name can match nothing.
    if not text or ":" in text or any(not "\x21" <= ch <= "\x7e" for ch in text):
        raise ParseError(f"invalid header field name {text!r}")
    return text


def parse_command(parts: Sequence[bytes]) -> Command:
    """Parse one command: ``parts`` alternates lines (without CRLF) and literal payloads.

    parts[0] is the first line (ending in ``{n}`` if a literal follows), parts[1] the n octets,
    parts[2] the line that continues after the literal, and so on; the last piece is a line.
    """
    if not parts or len(parts) % 2 == 0:
        raise ParseError("a command is lines and literals, ending with a line")
    reader = _Reader(parts)
    tag = reader.tag()
    try:
        reader.expect(_SP, "SP after the tag")
        name = reader.command_name()
        if name == "UID":
            reader.expect(_SP, "SP after UID")
            name = "UID " + reader.command_name()
        args: list[Token] = []
        while not reader.at_end():
            reader.expect(_SP, "SP between arguments")
            args.append(reader.token(0))
    except ParseError as exc:
        exc.tag = tag
        raise
    return Command(tag, name, args)


# --------------------------------------------------------------------------- character classes


def _is_atom(text: str) -> bool:
    """ATOM-CHARs only: no ( ) { SP CTL % * " \\ ] and nothing 8-bit."""
    return bool(text) and not any(ch in '(){%*"\\]' or not "\x21" <= ch <= "\x7e" for ch in text)


def _is_astring_atom(text: str) -> bool:
    """ASTRING-CHARs only: ATOM-CHAR plus "]"."""
    return bool(text) and not any(ch in '(){%*"\\' or not "\x21" <= ch <= "\x7e" for ch in text)


def _is_list_atom(text: str) -> bool:
    """list-chars: ATOM-CHAR, list-wildcards and resp-specials."""
    return bool(text) and not any(ch in '(){"\\' or not "\x21" <= ch <= "\x7e" for ch in text)


def quote(text: str) -> str:
    """``text`` as an IMAP astring: bare when it is a plain atom, else a quoted string.

    For ASCII text without CR/LF only; anything else needs a literal, which is the
    response writer's business.
    """
    if _is_astring_atom(text) and text.upper() != "NIL":
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- argument helpers


def keyword(token: Token) -> str:
    """An atom used as a keyword (command argument names, SEARCH keys, FETCH items), upper-cased."""
    if not isinstance(token, Atom):
        raise ParseError("expected a keyword")
    return token.value.upper()


def is_nil(token: Token) -> bool:
    return isinstance(token, Atom) and token.value.upper() == "NIL"


def _nz_number_text(text: str) -> int:
    value = _number_text(text)
    if value == 0:
        raise ParseError("0 is not a valid number here")
    return value


def _number_text(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_DIGITS:
        raise ParseError(f"invalid number {text[:20]!r}")
    value = int(text)
    if value > MAX_NUMBER:
        raise ParseError(f"number {text} out of range")
    return value


def number(token: Token) -> int:
    """RFC 3501 number: 0 .. 2**32-1."""
    if not isinstance(token, Atom):
        raise ParseError("expected a number")
    return _number_text(token.value)


def nz_number(token: Token) -> int:
    """RFC 3501 nz-number: 1 .. 2**32-1."""
    if not isinstance(token, Atom):
        raise ParseError("expected a number")
    return _nz_number_text(token.value)


def astring(token: Token) -> bytes:
    """RFC 3501 astring: an atom of ASTRING-CHARs, a quoted string or a literal."""
    if isinstance(token, QuotedString | LiteralString):
        return token.value
    if isinstance(token, Atom) and _is_astring_atom(token.value):
        return token.value.encode("ascii")
    raise ParseError("expected an atom or a string")


def nstring(token: Token) -> bytes | None:
    """RFC 3501 nstring: a string, or NIL (None)."""
    if isinstance(token, QuotedString | LiteralString):
        return token.value
    if is_nil(token):
        return None
    raise ParseError("expected a string or NIL")


def list_mailbox(token: Token) -> bytes:
    """RFC 3501 list-mailbox: like astring, but "%" and "*" are allowed in the atom form."""
    if isinstance(token, QuotedString | LiteralString):
        return token.value
    if isinstance(token, Atom) and _is_list_atom(token.value):
        return token.value.encode("ascii")
    raise ParseError("expected a mailbox pattern")


class MailboxNameError(ParseError):
    """A well-formed string that is no mailbox name's wire form (e.g. non-canonical modified
    UTF-7): the command is valid, the name is not, so the answer is NO, not BAD."""


def _decode_name(raw: bytes, utf8: bool) -> str:
    try:
        if utf8:
            # RFC 6855 3: after ENABLE UTF8=ACCEPT names are sent as UTF-8, not modified UTF-7.
            return raw.decode("utf-8")
        return decode_mailbox(raw.decode("ascii"))
    except ValueError as exc:  # UnicodeDecodeError included
        raise MailboxNameError(f"invalid mailbox name: {exc}") from None


def mailbox_name(token: Token, utf8: bool = False) -> str:
    """A mailbox argument, decoded from modified UTF-7 (or UTF-8 when ``utf8``).

    INBOX is case-insensitive (RFC 3501 5.1), so any spelling of it, also as the first level of
    a hierarchical name ("inbox/Sub"), comes back as "INBOX".
    """
    name = _decode_name(astring(token), utf8)
    if name[:5].upper() == "INBOX" and (len(name) == 5 or name[5] == "/"):
        name = "INBOX" + name[5:]
    return name


def list_pattern(token: Token, utf8: bool = False) -> str:
    """A LIST/LSUB reference or pattern argument, decoded like ``mailbox_name``."""
    return _decode_name(list_mailbox(token), utf8)


# --------------------------------------------------------------------------- sequence sets

_SEQ_ITEM_RE = re.compile(r"([0-9]+|\*)(?::([0-9]+|\*))?")


class SequenceSet:
    """An RFC 3501 sequence-set, kept as the ranges it was written as (never expanded).

    ``ranges`` holds (first, last) pairs as written, None standing for "*". "*" means the
    largest number in use: the message count for sequence numbers, the highest UID for UIDs,
    which is the ``max_value`` passed to the methods.
    """

    __slots__ = ("ranges", "_cache")

    def __init__(self, ranges: Iterable[tuple[int | None, int | None]]) -> None:
        self.ranges: tuple[tuple[int | None, int | None], ...] = tuple(ranges)
        if not self.ranges:
            raise ParseError("empty sequence set")
        self._cache: tuple[int, list[tuple[int, int]], list[int]] | None = None

    @classmethod
    def parse(cls, text: str) -> SequenceSet:
        ranges: list[tuple[int | None, int | None]] = []
        for item in text.split(","):
            m = _SEQ_ITEM_RE.fullmatch(item)
            if not m:
                raise ParseError(f"invalid sequence set {text[:40]!r}")
            first = None if m.group(1) == "*" else _nz_number_text(m.group(1))
            if m.group(2) is None:
                last = first
            else:
                last = None if m.group(2) == "*" else _nz_number_text(m.group(2))
            ranges.append((first, last))
        return cls(ranges)

    @classmethod
    def from_values(cls, values: Iterable[int]) -> SequenceSet:
        """The compact set of some numbers (for COPYUID, ESEARCH and the like)."""
        ranges: list[tuple[int | None, int | None]] = []
        lo = hi = -1
        for v in sorted(set(values)):
            if v == hi + 1:
                hi = v
                continue
            if hi >= 0:
                ranges.append((lo, hi))
            lo = hi = v
        if hi >= 0:
            ranges.append((lo, hi))
        return cls(ranges)

    @property
    def has_star(self) -> bool:
        return any(a is None or b is None for a, b in self.ranges)

    def _resolved(self, max_value: int) -> tuple[list[tuple[int, int]], list[int]]:
        # SEARCH asks contains() once per message; resolve once per max_value.
        cache = self._cache  # read once: a search may run in a worker thread
        if cache is not None and cache[0] == max_value:
            return cache[1], cache[2]
        spans: list[tuple[int, int]] = []
        for a, b in self.ranges:
            lo = max_value if a is None else a
            hi = max_value if b is None else b
            if lo > hi:
                lo, hi = hi, lo  # RFC 3501 9: "n:m" and "m:n" are the same range
            lo = max(lo, 1)  # "*" in an empty mailbox (max_value 0) stands for nothing
            if hi >= lo:
                spans.append((lo, hi))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        starts = [lo for lo, _ in merged]
        self._cache = (max_value, merged, starts)
        return merged, starts

    def resolve(self, max_value: int) -> list[tuple[int, int]]:
        """Sorted, disjoint, non-adjacent (first, last) ranges with "*" = max_value.

        Not clipped to max_value: "1:4294967295" stays that, ranges are cheap.
        """
        return list(self._resolved(max_value)[0])

    def contains(self, value: int, max_value: int) -> bool:
        ranges, starts = self._resolved(max_value)
        i = bisect_right(starts, value) - 1
        return i >= 0 and value <= ranges[i][1]

    def select(self, values: Sequence[int], max_value: int) -> list[int]:
        """The members of ``values`` (sorted ascending, e.g. a mailbox's UIDs) in the set.

        Two binary searches per range, so the cost depends on the number of ranges and of
        matches, not on the span a range covers.
        """
        out: list[int] = []
        i = 0
        for lo, hi in self._resolved(max_value)[0]:
            i = bisect_left(values, lo, i)
            j = bisect_right(values, hi, i)
            out.extend(values[i:j])
            i = j
        return out

    def __str__(self) -> str:
        def num(n: int | None) -> str:
            return "*" if n is None else str(n)

        return ",".join(num(a) if a == b else f"{num(a)}:{num(b)}" for a, b in self.ranges)

    def __repr__(self) -> str:
        return f"SequenceSet({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SequenceSet) and self.ranges == other.ranges

    def __hash__(self) -> int:
        return hash(self.ranges)


def parse_sequence_set(token: Token) -> SequenceSet:
    if not isinstance(token, Atom):
        raise ParseError("expected a sequence set")
    return SequenceSet.parse(token.value)


# --------------------------------------------------------------------------- flags

# Canonical spellings: flags are case-insensitive (RFC 3501 9 note), the store keeps one form.
SYSTEM_FLAGS = {f.upper(): f for f in (
    "\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\Recent")}


def parse_flag(token: Token) -> str:
    """One flag: a system flag (canonical capitalisation), a \\extension or a keyword atom.

    \\Recent is returned like any system flag; refusing to let clients set it is the
    command's business.
    """
    if not isinstance(token, Atom):
        raise ParseError("expected a flag")
    text = token.value
    if text.startswith("\\"):
        if not _is_atom(text[1:]):
            raise ParseError(f"invalid flag {text!r}")
        return SYSTEM_FLAGS.get(text.upper(), text)
    if not _is_atom(text):
        raise ParseError(f"invalid flag {text!r}")
    return text


def parse_flag_list(token: Token) -> list[str]:
    """RFC 3501 flag-list: "(" [flag *(SP flag)] ")", duplicates dropped, order kept."""
    if not isinstance(token, ParenList):
        raise ParseError("expected a parenthesised flag list")
    flags: list[str] = []
    for item in token.items:
        flag = parse_flag(item)
        if flag not in flags:
            flags.append(flag)
    return flags


# --------------------------------------------------------------------------- dates

_MONTHS = {m: i for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}
_DATE_RE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
# date-day-fixed is (SP DIGIT) / 2DIGIT; a bare single digit is accepted too, as some clients
# send it and it is unambiguous.
_DATETIME_RE = re.compile(
    r"( ?[0-9]|[0-9]{2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) "
    r"([+-])([0-9]{2})([0-9]{2})")


def _date_text(value: str | bytes | Token) -> str:
    if isinstance(value, Atom):
        return value.value
    if isinstance(value, QuotedString):
        value = value.value
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise ParseError("dates are ASCII") from None
    if isinstance(value, str):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        return value
    raise ParseError("expected a date")


def _make_date(day: str, month: str, year: str) -> date:
    mon = _MONTHS.get(month.upper())
    if mon is None:
        raise ParseError(f"invalid month {month!r}")
    try:
        return date(int(year), mon, int(day))
    except ValueError as exc:
        raise ParseError(f"invalid date: {exc}") from None


def parse_date(value: str | bytes | Token) -> date:
    """RFC 3501 date: "1-Feb-1994", bare or in double quotes (as text or a token)."""
    text = _date_text(value)
    m = _DATE_RE.fullmatch(text)
    if not m:
        raise ParseError(f"invalid date {text[:40]!r}")
    return _make_date(*m.groups())


def parse_datetime(value: str | bytes | Token) -> datetime:
    """RFC 3501 date-time: "17-Jul-1996 02:44:25 -0700", as an aware datetime."""
    text = _date_text(value)
    m = _DATETIME_RE.fullmatch(text)
    if not m:
        raise ParseError(f"invalid date-time {text[:40]!r}")
    day, month, year, hh, mm, ss, sign, zh, zm = m.groups()
    d = _make_date(day.strip(), month, year)
    hour, minute, second = int(hh), int(mm), int(ss)
    if hour > 23 or minute > 59 or second > 60:
        raise ParseError(f"invalid time {hh}:{mm}:{ss}")
    if int(zh) > 23 or int(zm) > 59:
        raise ParseError(f"invalid zone {sign}{zh}{zm}")
    offset = timedelta(hours=int(zh), minutes=int(zm))
    tz = timezone(-offset if sign == "-" else offset)
    # A leap second (:60) has no datetime; the second before it is as good for an INTERNALDATE.
    return datetime(d.year, d.month, d.day, hour, minute, min(second, 59), tzinfo=tz)


# --------------------------------------------------------------------------- LIST patterns


def mailbox_pattern(reference: str, pattern: str, delimiter: str = "/") -> Callable[[str], bool]:
    """A predicate telling which mailbox names a LIST/LSUB reference and pattern select.

    The two are joined by concatenation (RFC 3501 6.3.8 leaves the interpretation to the
    server; concatenation is what its examples show). "*" matches any run of characters,
    "%" any run without the hierarchy delimiter. Matching is case-sensitive, except that the
    name INBOX, and the first level of names under it, match case-insensitively.

    The pattern runs as a bit-parallel automaton (shift-and) over the name: time is linear in
    the name's length whatever the wildcards, where a backtracking matcher is exponential.
    """
    # Collapse wildcard runs: any run holding a "*" is "*", a run of "%" is "%". This keeps
    # consecutive wildcards apart, so one shift computes the empty-match closure below.
    tokens: list[str] = []
    for ch in reference + pattern:
        if ch in "*%" and tokens and tokens[-1] in "*%":
            if ch == "*":
                tokens[-1] = "*"
            continue
        tokens.append(ch)
    star = pct = 0
    char_masks: dict[str, int] = {}
    for j, t in enumerate(tokens):
        if t == "*":
            star |= 1 << j
        elif t == "%":
            pct |= 1 << j
        else:
            char_masks[t] = char_masks.get(t, 0) | 1 << j
    wild = star | pct
    accept = 1 << len(tokens)

    def closure(states: int) -> int:
        # A wildcard may match nothing: being before it also means being after it.
        return states | ((states & wild) << 1)

    def matches(name: str) -> bool:
        inbox = name[:5].upper() == "INBOX" and (len(name) == 5 or name[5:6] == delimiter)
        states = closure(1)
        for i, c in enumerate(name):
            if inbox and i < 5:
                lit = char_masks.get(c.upper(), 0) | char_masks.get(c.lower(), 0)
            else:
                lit = char_masks.get(c, 0)
            nxt = states & star
            if c != delimiter:
                nxt |= states & pct
            nxt |= (states & lit) << 1
            states = closure(nxt)
            if not states:
                return False
        return bool(states & accept)

    return matches
