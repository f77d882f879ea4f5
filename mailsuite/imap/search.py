"""SEARCH and UID SEARCH (RFC 3501 6.4.4): the key grammar and its evaluation.

``parse_search`` turns the command's arguments into a tree of ``SearchKey`` nodes; the
negative and derived keys are rewritten into the basic ones (UNSEEN is NOT SEEN, NEW is
RECENT and NOT SEEN, OLD is NOT RECENT, FROM is HEADER FROM, ...). ``matches`` evaluates a
tree against one message. Conjunctions and disjunctions are ordered so that keys answered from
the message's metadata run before keys that need its bytes, and the bytes are fetched
(``SearchMessage.raw``) only if such a key is actually reached: a search on flags, dates, sizes
or numbers never loads a message.

String keys match case-insensitively as substrings of the decoded text: RFC 2047
encoded-words in header fields are decoded (and raw UTF-8 in them is read as UTF-8, RFC 6532);
BODY and TEXT look into the text/* parts after undoing their quoted-printable or base64
transfer encoding and charset. Both sides are NFC-normalised and case-folded.

Search is total and linear: the message is split by mailsuite.structure (one pass, nesting
capped) rather than the email package (whose walk recurses once per level), and a charset is
decoded only when it is one of the C-implemented codecs in ``SAFE_CHARSETS``; any other (an
unknown name, or a Python-level codec such as punycode, which is quadratic, or idna, which
raises) is read as UTF-8 with invalid octets replaced, i.e. matched against the bytes. The
search program itself is parsed and evaluated with explicit stacks, so its size is limited by
a count of keys (``MAX_SEARCH_KEYS``), not by the depth of the interpreter's stack.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from email.utils import parsedate_to_datetime

from mailsuite.imap.parser import (
    Atom,
    ParenList,
    ParseError,
    SequenceSet,
    Token,
    astring,
    keyword,
    number,
    parse_date,
    parse_flag,
)
from mailsuite.structure import header_fields, text_parts

__all__ = [
    "SUPPORTED_CHARSETS", "SAFE_CHARSETS", "MAX_SEARCH_KEYS", "BadCharset", "TooComplex",
    "All", "Flag", "Recent", "Not", "And", "Or", "Header", "Body", "Text", "InternalDate",
    "SentDate", "Size", "SeqSet", "UidSet", "SearchKey", "SearchMessage", "SearchContext",
    "parse_search", "matches", "needs_raw",
]

SUPPORTED_CHARSETS = ("UTF-8", "US-ASCII")
# Search keys (NOT, OR and parenthesised lists included) in one program. Clients that search
# for a list of message ids or senders build OR chains of hundreds or a few thousand keys;
# ten thousand leaves room for them, while parsing and evaluating stays a matter of
# milliseconds per message. Nesting costs no stack: both walk the tree with explicit stacks.
MAX_SEARCH_KEYS = 10_000

# Charsets decoded as declared, by codec name (codecs.lookup(...).name): the C-implemented
# codecs, whose cost is linear in the input. Any other charset is matched as UTF-8 bytes.
SAFE_CHARSETS = frozenset({
    "ascii", "utf-8", "utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-32-be", "utf-32-le",
    "utf-7", "utf-8-sig",
    *(f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)),
    *(f"cp{n}" for n in (437, 737, 775, 850, 852, 855, 857, 858, 860, 861, 862, 863, 864, 865,
                         866, 869, 874, 1250, 1251, 1252, 1253, 1254, 1255, 1256, 1257, 1258,
                         932, 949, 950)),
    "koi8-r", "koi8-u", "koi8-t", "mac-roman", "mac-cyrillic", "mac-greek", "mac-latin2",
    "tis-620", "big5", "big5hkscs", "gb2312", "gbk", "gb18030", "hz", "euc_jp",
    "euc_jis_2004", "euc_jisx0213", "euc_kr", "johab", "shift_jis", "shift_jis_2004",
    "shift_jisx0213", "iso2022_jp", "iso2022_jp_1", "iso2022_jp_2", "iso2022_jp_2004",
    "iso2022_jp_3", "iso2022_jp_ext", "iso2022_kr",
})


class TooComplex(ParseError):
    """A search program with more than MAX_SEARCH_KEYS keys: the answer is NO [LIMIT]."""


class BadCharset(ParseError):
    """A CHARSET we do not search in: the answer is NO [BADCHARSET (UTF-8 US-ASCII)]."""

    supported = SUPPORTED_CHARSETS

    def __init__(self, charset: str, tag: str | None = None) -> None:
        super().__init__(f"unsupported charset {charset!r}", tag)
        self.charset = charset


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class All:
    pass


@dataclass(frozen=True)
class Flag:
    name: str  # canonical system flag ("\\Seen") or keyword; compared case-insensitively


@dataclass(frozen=True)
class Recent:
    pass


@dataclass(frozen=True)
class Not:
    key: SearchKey
    # Whether the subtree reads the message, worked out once when the node is made, so that
    # needs_raw never walks a deep tree.
    raw: bool = field(default=False, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", needs_raw(self.key))


@dataclass(frozen=True)
class And:
    keys: tuple[SearchKey, ...]  # cheap keys first
    raw: bool = field(default=False, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", any(needs_raw(k) for k in self.keys))


@dataclass(frozen=True)
class Or:
    keys: tuple[SearchKey, ...]  # cheap keys first
    raw: bool = field(default=False, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw", any(needs_raw(k) for k in self.keys))


@dataclass(frozen=True)
class Header:
    field: str  # lower-case field name
    value: str  # folded needle; "" matches every message that has the field


@dataclass(frozen=True)
class Body:
    value: str  # folded needle


@dataclass(frozen=True)
class Text:
    value: str  # folded needle, looked for in the header and in the body


@dataclass(frozen=True)
class InternalDate:
    op: str  # "before", "on" or "since"
    value: date


@dataclass(frozen=True)
class SentDate:
    op: str  # "before", "on" or "since", against the Date: header field
    value: date


@dataclass(frozen=True)
class Size:
    op: str  # "larger" or "smaller"
    value: int


@dataclass(frozen=True)
class SeqSet:
    set: SequenceSet  # message sequence numbers, "*" = ctx.max_seq


@dataclass(frozen=True)
class UidSet:
    set: SequenceSet  # UIDs, "*" = ctx.max_uid


SearchKey = (All | Flag | Recent | Not | And | Or | Header | Body | Text | InternalDate | SentDate
             | Size | SeqSet | UidSet)


def needs_raw(key: SearchKey) -> bool:
    """Whether evaluating the key may need the message's bytes."""
    if isinstance(key, Header | Body | Text | SentDate):
        return True
    if isinstance(key, Not | And | Or):
        return key.raw
    return False


def _ordered(keys: Iterable[SearchKey], kind: type[And] | type[Or]) -> list[SearchKey]:
    flat: list[SearchKey] = []
    for k in keys:
        # (a (b c)) is (a b c): flattening keeps evaluation depth low for long chains.
        flat.extend(k.keys if isinstance(k, kind) else (k,))
    return sorted(flat, key=needs_raw)  # stable: metadata keys first, else as written


def _and(keys: Iterable[SearchKey]) -> SearchKey:
    flat = _ordered(keys, And)
    return flat[0] if len(flat) == 1 else And(tuple(flat))


def _or(keys: Iterable[SearchKey]) -> SearchKey:
    flat = _ordered(keys, Or)
    return flat[0] if len(flat) == 1 else Or(tuple(flat))


# --------------------------------------------------------------------------- parsing

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
}
_ADDRESS_KEYS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "SUBJECT": "subject", "TO": "to"}
_DATE_KEYS = {
    "BEFORE": (InternalDate, "before"), "ON": (InternalDate, "on"),
    "SINCE": (InternalDate, "since"), "SENTBEFORE": (SentDate, "before"),
    "SENTON": (SentDate, "on"), "SENTSINCE": (SentDate, "since"),
}


def _fold(text: str) -> str:
    return unicodedata.normalize("NFC", text).casefold()


def parse_search(tokens: Sequence[Token], charset: str | None = None) -> SearchKey:
    """The search program in a SEARCH command's arguments (after UID, before nothing else).

    The charset may be passed in, or the arguments may start with CHARSET <astring>; not both.
    Without a charset the strings are read as UTF-8 too (US-ASCII is a subset, and clients
    often send UTF-8 without saying so).
    """
    args = list(tokens)
    if args and isinstance(args[0], Atom) and args[0].upper() == "CHARSET":
        if charset is not None or len(args) < 2:
            raise ParseError("CHARSET needs exactly one charset name")
        try:
            charset = astring(args[1]).decode("ascii")
        except UnicodeDecodeError:
            raise BadCharset(astring(args[1]).decode("ascii", "replace")) from None
        args = args[2:]
    if charset is not None and charset.upper() not in SUPPORTED_CHARSETS:
        raise BadCharset(charset)
    keys = _parse_keys(args)
    if not keys:
        raise ParseError("SEARCH needs at least one search key")
    return _and(keys)


class _Reader:
    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.tokens)

    def next(self, what: str) -> Token:
        if self.pos >= len(self.tokens):
            raise ParseError(f"missing {what}")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def string(self, what: str) -> str:
        try:
            return astring(self.next(what)).decode("utf-8")
        except UnicodeDecodeError:
            raise ParseError(f"{what} is not valid UTF-8") from None


@dataclass
class _Pending:
    """A key being read: a parenthesised list (arity None: all keys its reader holds), or
    NOT (1) or OR (2), whose operands come from the reader the operator was read from."""

    kind: str  # "list", "not" or "or"
    arity: int | None
    reader: _Reader
    keys: list[SearchKey] = field(default_factory=list)


def _parse_keys(tokens: Sequence[Token]) -> list[SearchKey]:
    """The keys of a search program, read with an explicit stack of pending operators, so that
    an OR chain thousands of keys deep costs no interpreter stack."""
    root = _Pending("list", None, _Reader(tokens))
    stack = [root]
    count = 0
    while True:
        top = stack[-1]
        if top.arity is None and top.reader.at_end():
            stack.pop()
            if not stack:
                return top.keys
            if not top.keys:
                raise ParseError("empty parenthesised search key")
            _complete(stack, _and(top.keys))
            continue
        reader = top.reader
        token = reader.next("search key")
        count += 1
        if count > MAX_SEARCH_KEYS:
            raise TooComplex(f"more than {MAX_SEARCH_KEYS} search keys")
        if isinstance(token, ParenList):
            stack.append(_Pending("list", None, _Reader(token.items)))
            continue
        if not isinstance(token, Atom):
            raise ParseError("expected a search key")
        word = token.upper()
        if word == "NOT":
            stack.append(_Pending("not", 1, reader))
        elif word == "OR":
            stack.append(_Pending("or", 2, reader))
        else:
            _complete(stack, _simple_key(word, token, reader))


def _complete(stack: list[_Pending], key: SearchKey) -> None:
    """Hand a finished key to the operator waiting for it, finishing operators in turn."""
    while True:
        top = stack[-1]
        top.keys.append(key)
        if top.arity is None or len(top.keys) < top.arity:
            return
        stack.pop()
        key = Not(top.keys[0]) if top.kind == "not" else _or(top.keys)


def _simple_key(word: str, token: Atom, reader: _Reader) -> SearchKey:
    """A key other than NOT, OR and a parenthesised list."""
    if word[:1].isdigit() or word[:1] == "*":
        return SeqSet(SequenceSet.parse(token.value))
    if word == "ALL":
        return All()
    if word in _FLAG_KEYS:
        flag, present = _FLAG_KEYS[word]
        return Flag(flag) if present else Not(Flag(flag))
    if word in ("KEYWORD", "UNKEYWORD"):
        flag = parse_flag(reader.next("keyword"))
        if flag.startswith("\\"):
            raise ParseError(f"{word} takes a keyword, not the system flag {flag}")
        return Flag(flag) if word == "KEYWORD" else Not(Flag(flag))
    if word == "RECENT":
        return Recent()
    if word == "NEW":
        return And((Recent(), Not(Flag("\\Seen"))))
    if word == "OLD":
        return Not(Recent())
    if word in _ADDRESS_KEYS:
        return Header(_ADDRESS_KEYS[word], _fold(reader.string(f"{word} string")))
    if word == "HEADER":
        name = reader.string("header field name")
        return Header(name.lower(), _fold(reader.string("header string")))
    if word == "BODY":
        return Body(_fold(reader.string("BODY string")))
    if word == "TEXT":
        return Text(_fold(reader.string("TEXT string")))
    if word in _DATE_KEYS:
        cls, op = _DATE_KEYS[word]
        return cls(op, parse_date(reader.next(f"{word} date")))
    if word in ("LARGER", "SMALLER"):
        return Size(word.lower(), number(reader.next(f"{word} size")))
    if word == "UID":
        return UidSet(SequenceSet.parse(keyword(reader.next("UID set"))))
    raise ParseError(f"unknown search key {token.value[:40]!r}")


# --------------------------------------------------------------------------- evaluation


@dataclass
class SearchMessage:
    """What a search looks at. Any object with these attributes will do.

    ``raw`` returns the whole RFC 5322 message; it is called at most once per ``matches``
    call, and only when a key needs the header or body.
    """

    seq: int
    uid: int
    flags: set[str]
    internal_date: datetime  # aware
    size: int  # RFC822.SIZE
    recent: bool
    raw: Callable[[], bytes]


@dataclass(frozen=True)
class SearchContext:
    max_seq: int  # the message count: what "*" means in a sequence set
    max_uid: int  # the highest UID in the mailbox: what "*" means in a UID set


def matches(key: SearchKey, msg: SearchMessage, ctx: SearchContext) -> bool:
    """Whether the message satisfies the search key."""
    return _Evaluation(msg, ctx).test(key)


def _compare(op: str, value: date, wanted: date) -> bool:
    if op == "before":
        return value < wanted
    if op == "on":
        return value == wanted
    return value >= wanted  # since


# An RFC 2047 encoded-word: =?charset?Q|B?text?=. The classes exclude "?" (and whitespace),
# so matching never backtracks.
_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([qQbB])\?([^?\s]*)\?=")


def _decode_header_value(value: bytes) -> str:
    """A header field's value as text: raw 8-bit octets read as UTF-8 (RFC 6532), folding
    undone, and RFC 2047 encoded-words decoded. One pass, linear in the value: the email
    package's decode_header is quadratic in the number of encoded-words (1.7 MB take 12 s)."""
    text = value.decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    out: list[str] = []
    pending = bytearray()  # adjacent encoded-words in one charset, decoded together, so that
    pending_charset: str | None = None  # a character split between two of them survives
    pos = 0
    for match in _ENCODED_WORD.finditer(text):
        between = text[pos:match.start()]
        charset = match.group(1).split("*", 1)[0]  # RFC 2231 5: charset*language
        # White space between two encoded-words is dropped (RFC 2047 6.2).
        if pending_charset is None or between.strip() or charset.lower() != pending_charset:
            if pending_charset is not None:
                out.append(_decode_bytes(bytes(pending), pending_charset))
                pending.clear()
            out.append(between)
        pending_charset = charset.lower()
        data = match.group(3).encode("utf-8")
        if match.group(2) in "qQ":
            pending += binascii.a2b_qp(data, header=True)
        else:
            pending += _base64_decoded(data)
        pos = match.end()
    if pending_charset is not None:
        out.append(_decode_bytes(bytes(pending), pending_charset))
    out.append(text[pos:])
    return "".join(out)


def _codec(charset: str) -> str:
    """The codec to read a declared charset with: itself when it is safe, else UTF-8."""
    try:
        name = codecs.lookup(charset.strip()).name
    except (LookupError, ValueError):  # ValueError: e.g. a NUL in the name
        return "utf-8"
    # Undeclared or mislabelled 8-bit text is most often UTF-8, which also holds all ASCII.
    return name if name in SAFE_CHARSETS and name != "ascii" else "utf-8"


def _decode_bytes(data: bytes, charset: str) -> str:
    return data.decode(_codec(charset), "replace")


def _transfer_decoded(body: bytes, encoding: bytes | None) -> bytes:
    """The body with its quoted-printable or base64 transfer encoding undone; the body as it
    stands when the encoding is another or is broken."""
    name = (encoding or b"").strip().lower()
    try:
        if name == b"base64":
            return _base64_decoded(body)
        if name == b"quoted-printable":
            return binascii.a2b_qp(body)
    except binascii.Error:
        pass
    return body


def _base64_decoded(data: bytes) -> bytes:
    """Lenient, as readers are: characters outside the alphabet (padding included) are
    skipped, and a lone last character, which holds no whole octet, is dropped."""
    data = data.translate(None, _NOT_BASE64)
    return binascii.a2b_base64(data[: len(data) - (len(data) % 4 == 1)] + b"==")


_NOT_BASE64 = bytes(c for c in range(256)
                    if c not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _part_text(charset: bytes | None, encoding: bytes | None, body: bytes) -> str:
    data = _transfer_decoded(body, encoding)
    return _decode_bytes(data, charset.decode("ascii", "replace") if charset else "us-ascii")


class _Evaluation:
    """One message under one search: reads the message at most once, and only if needed."""

    def __init__(self, msg: SearchMessage, ctx: SearchContext) -> None:
        self.msg = msg
        self.ctx = ctx
        self._flags: set[str] | None = None
        self._raw: bytes | None = None
        self._fields: list[tuple[bytes, bytes]] | None = None
        self._headers: dict[str, list[str]] | None = None  # lower name -> folded values
        self._header_text: str | None = None
        self._body: list[str] | None = None
        self._sent: date | None = None
        self._sent_done = False

    def test(self, root: SearchKey) -> bool:
        """Evaluate with an explicit stack of (operator, index of the operand being tested),
        short-circuiting AND and OR, so a deep tree costs no interpreter stack."""
        stack: list[list] = []
        node = root
        while True:
            while isinstance(node, Not | And | Or):
                stack.append([node, 0])
                node = node.key if isinstance(node, Not) else node.keys[0]
            value = self.leaf(node)
            while stack:
                frame = stack[-1]
                op = frame[0]
                if isinstance(op, Not):
                    value = not value
                    stack.pop()
                    continue
                frame[1] += 1
                if value == isinstance(op, Or) or frame[1] == len(op.keys):
                    stack.pop()  # decided: AND by a false operand, OR by a true one, or all seen
                    continue
                node = op.keys[frame[1]]
                break
            else:
                return value

    def leaf(self, key: SearchKey) -> bool:
        msg = self.msg
        match key:
            case All():
                return True
            case Flag(name):
                if self._flags is None:
                    self._flags = {f.casefold() for f in msg.flags}
                return name.casefold() in self._flags
            case Recent():
                return msg.recent
            case SeqSet(seqset):
                return seqset.contains(msg.seq, self.ctx.max_seq)
            case UidSet(uidset):
                return uidset.contains(msg.uid, self.ctx.max_uid)
            case Size(op, value):
                return msg.size > value if op == "larger" else msg.size < value
            case InternalDate(op, value):
                # RFC 3501: dates only, "disregarding time and timezone": the internal date's
                # calendar day in the zone it carries.
                return _compare(op, msg.internal_date.date(), value)
            case SentDate(op, value):
                sent = self.sent_date()
                return sent is not None and _compare(op, sent, value)
            case Header(name, needle):
                return any(needle in v for v in self.headers().get(name, ()))
            case Body(needle):
                return any(needle in t for t in self.body())
            case Text(needle):
                return needle in self.header_text() or any(needle in t for t in self.body())
        raise TypeError(f"not a search key: {type(key).__name__}")

    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self.msg.raw()
        return self._raw

    def fields(self) -> list[tuple[bytes, bytes]]:
        if self._fields is None:
            self._fields = header_fields(self.raw())
        return self._fields

    def headers(self) -> dict[str, list[str]]:
        if self._headers is None:
            self._headers = {}
            for name, value in self.fields():
                self._headers.setdefault(name.decode("ascii", "surrogateescape"), []).append(
                    _fold(_decode_header_value(value)))
        return self._headers

    def header_text(self) -> str:
        if self._header_text is None:
            self._header_text = "\n".join(
                f"{name}: {value}" for name, values in self.headers().items() for value in values)
        return self._header_text

    def body(self) -> list[str]:
        if self._body is None:
            self._body = [_fold(_part_text(*part)) for part in text_parts(self.raw())]
        return self._body

    def sent_date(self) -> date | None:
        if not self._sent_done:
            self._sent_done = True
            value = next((v for n, v in self.fields() if n == b"date"), None)
            if value is not None:
                # No usable Date: no SENT* key matches.
                with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
                    # The calendar day as written in the field, zone disregarded (RFC 3501).
                    self._sent = parsedate_to_datetime(_decode_header_value(value)).date()
        return self._sent
