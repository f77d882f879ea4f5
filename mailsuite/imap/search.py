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
"""

from __future__ import annotations

import contextlib
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from email.header import decode_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
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

__all__ = [
    "SUPPORTED_CHARSETS", "MAX_SEARCH_DEPTH", "BadCharset", "All", "Flag", "Recent", "Not",
    "And", "Or", "Header", "Body", "Text", "InternalDate", "SentDate", "Size", "SeqSet",
    "UidSet", "SearchKey", "SearchMessage", "SearchContext", "parse_search", "matches",
    "needs_raw",
]

SUPPORTED_CHARSETS = ("UTF-8", "US-ASCII")
# Nesting of parentheses, NOT and OR together. Deep enough for the long OR chains some
# clients build, shallow enough that neither parsing nor evaluation can exhaust the stack.
MAX_SEARCH_DEPTH = 64


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


@dataclass(frozen=True)
class And:
    keys: tuple[SearchKey, ...]  # cheap keys first


@dataclass(frozen=True)
class Or:
    keys: tuple[SearchKey, ...]  # cheap keys first


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
    if isinstance(key, Not):
        return needs_raw(key.key)
    if isinstance(key, And | Or):
        return any(needs_raw(k) for k in key.keys)
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
    keys = _KeyReader(args).keys(0)
    if not keys:
        raise ParseError("SEARCH needs at least one search key")
    return _and(keys)


class _KeyReader:
    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def keys(self, depth: int) -> list[SearchKey]:
        keys: list[SearchKey] = []
        while self.pos < len(self.tokens):
            keys.append(self.key(depth))
        return keys

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

    def key(self, depth: int) -> SearchKey:
        if depth >= MAX_SEARCH_DEPTH:
            raise ParseError("search keys nested too deeply")
        token = self.next("search key")
        if isinstance(token, ParenList):
            inner = _KeyReader(token.items).keys(depth + 1)
            if not inner:
                raise ParseError("empty parenthesised search key")
            return _and(inner)
        if not isinstance(token, Atom):
            raise ParseError("expected a search key")
        word = token.upper()
        if word[:1].isdigit() or word[:1] == "*":
            return SeqSet(SequenceSet.parse(token.value))
        if word == "ALL":
            return All()
        if word in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[word]
            return Flag(flag) if present else Not(Flag(flag))
        if word in ("KEYWORD", "UNKEYWORD"):
            flag = parse_flag(self.next("keyword"))
            if flag.startswith("\\"):
                raise ParseError(f"{word} takes a keyword, not the system flag {flag}")
            return Flag(flag) if word == "KEYWORD" else Not(Flag(flag))
        if word == "RECENT":
            return Recent()
        if word == "NEW":
            return And((Recent(), Not(Flag("\\Seen"))))
        if word == "OLD":
            return Not(Recent())
        if word == "NOT":
            return Not(self.key(depth + 1))
        if word == "OR":
            first = self.key(depth + 1)
            return _or((first, self.key(depth + 1)))
        if word in _ADDRESS_KEYS:
            return Header(_ADDRESS_KEYS[word], _fold(self.string(f"{word} string")))
        if word == "HEADER":
            name = self.string("header field name")
            return Header(name.lower(), _fold(self.string("header string")))
        if word == "BODY":
            return Body(_fold(self.string("BODY string")))
        if word == "TEXT":
            return Text(_fold(self.string("TEXT string")))
        if word in _DATE_KEYS:
            cls, op = _DATE_KEYS[word]
            return cls(op, parse_date(self.next(f"{word} date")))
        if word in ("LARGER", "SMALLER"):
            return Size(word.lower(), number(self.next(f"{word} size")))
        if word == "UID":
            token = self.next("UID set")
            return UidSet(SequenceSet.parse(keyword(token)))
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


def _decode_header_value(value: str) -> str:
    if any("\udc80" <= ch <= "\udcff" for ch in value):
        # compat32 hands 8-bit octets over as surrogate escapes; RFC 6532 makes them UTF-8.
        value = value.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    value = value.replace("\r", "").replace("\n", "")  # unfold (RFC 5322 2.2.3)
    try:
        chunks = decode_header(value)
    except Exception:  # a malformed encoded-word: search the text as it stands
        return value
    out: list[str] = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            out.append(chunk)
        elif charset is None:
            out.append(chunk.decode("raw-unicode-escape"))  # how decode_header packed it
        else:
            out.append(_decode_bytes(chunk, charset))
    return "".join(out)


def _decode_bytes(data: bytes, charset: str) -> str:
    if charset.lower() in ("us-ascii", "ascii", "unknown-8bit"):
        charset = "utf-8"  # undeclared 8-bit text is most often UTF-8
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _part_text(part: Message) -> str:
    try:
        payload = part.get_payload(decode=True)  # undoes quoted-printable and base64
    except Exception:
        return ""
    if not isinstance(payload, bytes):
        return ""
    return _decode_bytes(payload, part.get_content_charset() or "us-ascii")


class _Evaluation:
    """One message under one search: parses the message at most once, and only if needed."""

    def __init__(self, msg: SearchMessage, ctx: SearchContext) -> None:
        self.msg = msg
        self.ctx = ctx
        self._flags: set[str] | None = None
        self._raw: bytes | None = None
        self._message: Message | None = None  # header-only or full parse
        self._full = False
        self._headers: dict[str, list[str]] | None = None  # lower name -> folded values
        self._header_text: str | None = None
        self._body: list[str] | None = None
        self._sent: date | None = None
        self._sent_done = False

    def test(self, key: SearchKey) -> bool:
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
            case Not(inner):
                return not self.test(inner)
            case And(keys):
                return all(self.test(k) for k in keys)
            case Or(keys):
                return any(self.test(k) for k in keys)
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
        raise TypeError(f"not a search key: {key!r}")

    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self.msg.raw()
        return self._raw

    def message(self, full: bool) -> Message:
        if self._message is None or (full and not self._full):
            self._message = BytesParser(policy=compat32).parsebytes(self.raw(),
                                                                    headersonly=not full)
            self._full = full
        return self._message

    def headers(self) -> dict[str, list[str]]:
        if self._headers is None:
            self._headers = {}
            # raw_items(): items() would wrap 8-bit values in email.header.Header objects.
            for name, value in self.message(False).raw_items():
                self._headers.setdefault(name.lower(), []).append(
                    _fold(_decode_header_value(value)))
        return self._headers

    def header_text(self) -> str:
        if self._header_text is None:
            self._header_text = "\n".join(
                f"{name}: {value}" for name, values in self.headers().items() for value in values)
        return self._header_text

    def body(self) -> list[str]:
        if self._body is None:
            self._body = [_fold(_part_text(part)) for part in self.message(True).walk()
                          if part.get_content_maintype() == "text"]
        return self._body

    def sent_date(self) -> date | None:
        if not self._sent_done:
            self._sent_done = True
            value = next((v for n, v in self.message(False).raw_items() if n.lower() == "date"),
                         None)
            if value is not None:
                # No usable Date: no SENT* key matches.
                with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
                    # The calendar day as written in the field, zone disregarded (RFC 3501).
                    self._sent = parsedate_to_datetime(_decode_header_value(value)).date()
        return self._sent

