"""Delivery status notifications: the bounce a sender gets when we give up on a recipient.

The report follows RFC 3464 (message/delivery-status) inside RFC 6522 multipart/report, and
is built by hand so that every line ends in CRLF and the whole message is 7-bit: it must be
deliverable to any server, including ones that offer neither 8BITMIME nor SMTPUTF8.
"""

from __future__ import annotations

import base64
import email.utils
import quopri
import re
import secrets
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32

SUBJECT = "Undelivered Mail Returned to Sender"
SUBJECT_EXPIRED = "Undelivered Mail Returned to Sender: Delivery time expired"

# Field values are cut here so a field line stays far below the 998-octet limit.
_MAX_VALUE = 900
_FOLD_AT = 78
_LINE_LIMIT = 998
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class FailedRecipient:
    recipient: str
    status: str  # enhanced status code, e.g. "5.1.1" or "4.4.7"
    diagnostic: str  # the remote reply, or our own explanation when no server answered
    remote_mta: str | None  # host name of the server that answered, if any
    last_attempt: datetime


def build_bounce(*, reporting_mta: str, original_sender: str, original: bytes,
                 recipients: Sequence[FailedRecipient], arrival_date: datetime,
                 queue_id: str, expired: bool = False, now: datetime | None = None) -> bytes:
    """A complete multipart/report bounce for `recipients`, addressed to `original_sender`."""
    if not original_sender:
        raise ValueError("a bounce is never sent to the null sender")
    if not recipients:
        raise ValueError("a bounce needs at least one failed recipient")
    now = now or datetime.now(UTC)
    boundary = f"mailsuite-dsn-{secrets.token_hex(12)}"
    sender = _strip_controls(original_sender)
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        # An internationalised sender can only be written in UTF-8 (RFC 6532); such a bounce
        # travels with SMTPUTF8 in any case, as its envelope recipient is the same address.
        f"To: <{sender}>",
        f"Subject: {SUBJECT_EXPIRED if expired else SUBJECT}",
        f"Date: {_date(now)}",
        f"Message-ID: {email.utils.make_msgid(domain=reporting_mta)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]
    parts = [
        _notification_part(reporting_mta, recipients, expired),
        _status_part(reporting_mta, queue_id, arrival_date, recipients),
        _headers_part(original),
    ]
    out = [_lines(head), b"\r\n", b"This is a MIME-encapsulated delivery status notification.\r\n"]
    for part in parts:
        out += [b"\r\n--", boundary.encode("ascii"), b"\r\n", part]
    out += [b"\r\n--", boundary.encode("ascii"), b"--\r\n"]
    return b"".join(out)


def is_auto_reply(raw: bytes) -> bool:
    """True for mail that must never cause a bounce or an auto-reply of its own (RFC 3834)."""
    match = _HEADER_END.search(raw)
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw[:match.end()] if match else raw)
    auto = headers.get("Auto-Submitted")
    if auto is not None and str(auto).split(";")[0].strip().lower() != "no":
        return True
    return headers.get_content_type() == "multipart/report"


def _notification_part(reporting_mta: str, recipients: Sequence[FailedRecipient],
                       expired: bool) -> bytes:
    if expired:
        intro = ("Your message could not be delivered to the recipients below before its "
                 "delivery time expired. The last reply or problem for each recipient is "
                 "shown; the header of your message is attached.")
    else:
        intro = ("Your message could not be delivered to one or more recipients. The reason "
                 "for each is shown below; the header of your message is attached.")
    paragraphs = [_wrap(f"This is the mail system at host {reporting_mta}."), _wrap(intro)]
    for rcpt in recipients:
        reason = _one_line(rcpt.diagnostic)
        if rcpt.remote_mta:
            reason = f"host {_one_line(rcpt.remote_mta)} said: {reason}"
        paragraphs.append(_wrap(f"<{_strip_controls(rcpt.recipient)}>: {reason}", "    "))
    text = "\n\n".join(paragraphs) + "\n"
    headers = ["Content-Description: Notification"]
    if text.isascii():
        headers.append("Content-Type: text/plain; charset=us-ascii")
        body = text.encode("ascii")
    else:
        headers += ["Content-Type: text/plain; charset=utf-8",
                    "Content-Transfer-Encoding: quoted-printable"]
        body = quopri.encodestring(text.encode("utf-8"))
    return _lines(headers) + b"\r\n" + _crlf(body)


def _status_part(reporting_mta: str, queue_id: str, arrival_date: datetime,
                 recipients: Sequence[FailedRecipient]) -> bytes:
    blocks = [[
        _field("Reporting-MTA", f"dns; {reporting_mta}"),
        _field("X-Mailsuite-Queue-ID", _one_line(queue_id)),
        _field("Arrival-Date", _date(arrival_date)),
    ]]
    for rcpt in recipients:
        block = [
            _field("Final-Recipient", _typed_address(rcpt.recipient)),
            _field("Action", "failed"),
            _field("Status", _one_line(rcpt.status)),
        ]
        if rcpt.remote_mta:
            block.append(_field("Remote-MTA", f"dns; {_one_line(rcpt.remote_mta)}"))
            block.append(_field("Diagnostic-Code", f"smtp; {_one_line(rcpt.diagnostic)}"))
        else:
            block.append(_field("Diagnostic-Code", f"X-Mailsuite; {_one_line(rcpt.diagnostic)}"))
        block.append(_field("Last-Attempt-Date", _date(rcpt.last_attempt)))
        blocks.append(block)
    headers = _lines(["Content-Description: Delivery report",
                      "Content-Type: message/delivery-status"])
    return headers + b"\r\n" + b"\r\n".join(_lines(block) for block in blocks)


def _headers_part(original: bytes) -> bytes:
    # Only the header section is returned: the body may be large, and the sender has it.
    match = _HEADER_END.search(original)
    section = original[:match.start()] if match else original
    section = _crlf(section.rstrip(b"\r\n")) + b"\r\n" if section.strip() else b""
    headers = ["Content-Description: Undelivered Message Headers"]
    too_long = any(len(line) >= _LINE_LIMIT for line in section.split(b"\r\n"))
    if section.isascii() and not too_long:
        headers.append("Content-Type: text/rfc822-headers")
        body = section
    else:
        headers += ["Content-Type: text/rfc822-headers; charset=utf-8",
                    "Content-Transfer-Encoding: base64"]
        body = _crlf(base64.encodebytes(section))
    return _lines(headers) + b"\r\n" + body


def _typed_address(address: str) -> str:
    """An address as a delivery-status field types it (RFC 3464 2.3.2, RFC 6533 3)."""
    address = _strip_controls(address)
    if address.isascii():
        return f"rfc822; {address[:_MAX_VALUE]}"
    # utf-8-addr-xtext: the 7-bit form, with "+", "=", "\" and non-ASCII as \x{HEX}.
    out = ""
    for ch in address:
        piece = ch if ch.isascii() and ch not in "+=\\" else f"\\x{{{ord(ch):X}}}"
        if len(out) + len(piece) > _MAX_VALUE:
            break
        out += piece
    return f"utf-8; {out}"


def _one_line(text: str) -> str:
    """`text` as one line of printable ASCII, cut to a length that always fits a field."""
    printable = "".join(
        ch if " " <= ch <= "~" else ("?" if ord(ch) > 127 else " ") for ch in text
    )
    line = " ".join(printable.split())
    return line if len(line) <= _MAX_VALUE else line[:_MAX_VALUE - 3] + "..."


def _strip_controls(text: str) -> str:
    """`text` without controls or whitespace, so nothing from outside can start a new line."""
    return "".join(ch for ch in text if ch > " " and ch != "\x7f")


def _wrap(text: str, indent: str = "") -> str:
    # Addresses and host names stay whole: a break at their hyphens would read as a space.
    return textwrap.fill(text, width=76, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def _field(name: str, value: str) -> str:
    """`name: value` folded at spaces to about 78 columns."""
    lines = [f"{name}:"]
    words_on_line = 0
    for word in value.split(" "):
        if words_on_line and len(lines[-1]) + 1 + len(word) > _FOLD_AT:
            lines.append("")
            words_on_line = 0
        lines[-1] += f" {word}"
        words_on_line += 1
    return "\r\n".join(lines)


def _date(when: datetime) -> str:
    # Stored times without a zone are UTC throughout mailsuite.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return email.utils.format_datetime(when)


def _lines(lines: Sequence[str]) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8")


def _crlf(data: bytes) -> bytes:
    return _LINE_BREAK.sub(b"\r\n", data)
