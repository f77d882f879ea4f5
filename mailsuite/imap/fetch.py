"""FETCH (RFC 3501 6.4.5): which data items a request asks for, and the response for one message.

Pure functions: the server loads the stored rows (only the columns the items need) in a
thread and calls `render` per message.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailsuite import structure
from mailsuite.imap.parser import Atom, FetchAtt, ParenList, ParseError, Token
from mailsuite.imap.selected import flag_list
from mailsuite.store import FetchRow

_MACROS = {
    "ALL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"],
    "FAST": ["FLAGS", "INTERNALDATE", "RFC822.SIZE"],
    "FULL": ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"],
}
_SIMPLE = {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE", "UID",
           "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class FetchRequest:
    items: list[str | FetchAtt]

    @property
    def needs_raw(self) -> bool:
        return any(isinstance(i, FetchAtt) or i in ("RFC822", "RFC822.HEADER", "RFC822.TEXT")
                   for i in self.items)

    @property
    def needs_structure(self) -> bool:
        return any(i in ("ENVELOPE", "BODY", "BODYSTRUCTURE") for i in self.items)

    @property
    def sets_seen(self) -> bool:
        """Fetching a body without .PEEK marks the message \\Seen (RFC 3501 6.4.5)."""
        return any((isinstance(i, FetchAtt) and not i.peek and not i.name.startswith("BINARY"))
                   or i in ("RFC822", "RFC822.TEXT") for i in self.items)


def parse_items(tokens: list[Token], uid_command: bool) -> FetchRequest:
    if len(tokens) != 1:
        raise ParseError("FETCH takes a sequence set and one item or a list of items")
    raw_items = tokens[0].items if isinstance(tokens[0], ParenList) else [tokens[0]]
    if not raw_items:
        raise ParseError("empty FETCH item list")
    items: list[str | FetchAtt] = []
    for token in raw_items:
        if isinstance(token, FetchAtt):
            if token.name not in ("BODY", "BODY.PEEK"):
                raise ParseError(f"{token.name} is not supported")
            items.append(token)
        elif isinstance(token, Atom) and token.upper() in _MACROS and len(raw_items) == 1:
            items.extend(_MACROS[token.upper()])
        elif isinstance(token, Atom) and token.upper() in _SIMPLE:
            items.append(token.upper())
        else:
            raise ParseError("unknown FETCH item")
    if uid_command and "UID" not in items:
        items.insert(0, "UID")  # RFC 3501 6.4.8: UID FETCH always answers with the UID
    return FetchRequest(items)


def internal_date(row: FetchRow) -> str:
    d = row.internal_date
    offset = d.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset else 0
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    return (f'"{d.day:02d}-{_MONTHS[d.month - 1]}-{d.year:04d} {d.hour:02d}:{d.minute:02d}:'
            f'{d.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}"')


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def render(seq: int, row: FetchRow, request: FetchRequest, flags: str, recent: bool,
           structure_cache: tuple[bytes, bytes, bytes] | None) -> bytes:
    """`* seq FETCH (...)` for one message, CRLF included."""
    parts: list[bytes] = []
    raw = row.raw or b""
    sections = structure.Sections(raw)  # split once for all the items that need it
    for item in request.items:
        if isinstance(item, FetchAtt):
            data = sections.get(item.part, item.text or "", item.fields)
            label = f"BODY[{item.section}]"
            if item.partial is not None:
                start, length = item.partial
                data = data[start:start + length]
                label += f"<{start}>"
            parts.append(label.encode() + b" " + _literal(data))
        elif item == "FLAGS":
            parts.append(b"FLAGS " + flag_list(flags, recent).encode())
        elif item == "UID":
            parts.append(b"UID %d" % row.uid)
        elif item == "INTERNALDATE":
            parts.append(b"INTERNALDATE " + internal_date(row).encode())
        elif item == "RFC822.SIZE":
            parts.append(b"RFC822.SIZE %d" % row.size)
        elif item in ("ENVELOPE", "BODY", "BODYSTRUCTURE"):
            assert structure_cache is not None
            envelope, bodystructure, body = structure_cache
            value = {"ENVELOPE": envelope, "BODY": body, "BODYSTRUCTURE": bodystructure}[item]
            parts.append(item.encode() + b" " + value)
        elif item == "RFC822":
            parts.append(b"RFC822 " + _literal(raw))
        elif item == "RFC822.HEADER":
            parts.append(b"RFC822.HEADER " + _literal(sections.get((), "HEADER")))
        elif item == "RFC822.TEXT":
            parts.append(b"RFC822.TEXT " + _literal(sections.get((), "TEXT")))
    return b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n"

