"""Build an RFC 5322 message from the parts an API caller gives: addresses, subject, text,
HTML, attachments and extra header fields. Pure: no I/O.

Python's email package (with policy.SMTP, never compat32) does the MIME and the encodings:
RFC 2047 for non-ASCII subjects and names, RFC 2231 for filenames, quoted-printable or base64
for bodies, so what leaves is 7-bit and needs neither 8BITMIME nor SMTPUTF8 unless an address
itself is non-ASCII. What callers give is checked strictly first: a CR or LF anywhere in a
header is injection, and an address list must read the same to us and to email.utils.
"""

from __future__ import annotations

import email.utils
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage

from mailsuite.addresses import Address, AddressError, parse_mailbox

# 7-bit transfer encodings for bodies; headers as RFC 5322 with CRLF.
_POLICY = policy.SMTP.clone(cte_type="7bit", max_line_length=78)
#: header fields the composer writes itself; a caller may not set them
OWN_FIELDS = frozenset({
    "from", "sender", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
    "content-disposition", "content-id", "received", "return-path", "dkim-signature",
    "arc-seal", "arc-message-signature", "arc-authentication-results",
    "authentication-results", "delivered-to",
})
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")
_NAMED = re.compile(r"^(?P<name>[^<>]*?)\s*<(?P<address>[^<>]*)>$")
MAX_HEADER_VALUE = 4000


class ComposeError(ValueError):
    """The caller's input cannot become a message; `param` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Mailbox:
    """An address with an optional display name."""

    address: Address
    name: str = ""

    def header(self) -> HeaderAddress:
        return HeaderAddress(display_name=self.name, username=self.address.local,
                             domain=self.address.domain)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes
    content_id: str | None = None
    inline: bool = False


@dataclass
class Draft:
    sender: Mailbox
    to: list[Mailbox] = field(default_factory=list)
    cc: list[Mailbox] = field(default_factory=list)
    bcc: list[Mailbox] = field(default_factory=list)
    reply_to: list[Mailbox] = field(default_factory=list)
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)

    @property
    def recipients(self) -> list[Address]:
        """Every envelope recipient once, in order: To, Cc, Bcc."""
        seen: dict[str, Address] = {}
        for box in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(box.address.normal, box.address)
        return list(seen.values())


def parse_mailbox_text(text: str, param: str) -> Mailbox:
    """`addr@example.org` or `Name <addr@example.org>`, strictly: a CR or LF, a comment, or
    anything that email.utils would read as another address is refused."""
    _check_header_text(text, param)
    text = text.strip()
    match = _NAMED.match(text)
    name, bare = (match.group("name").strip(), match.group("address")) if match else ("", text)
    if name.startswith('"') and name.endswith('"') and len(name) >= 2:
        name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if any(c in name for c in "<>()\\") or "@" in name:
        # A display name that holds an address (or a comment) is how mail impersonates.
        raise ComposeError(f"{text!r}: a display name may not contain an address, <>, () or \\",
                           param)
    try:
        address = parse_mailbox(bare)
    except AddressError as exc:
        raise ComposeError(f"{text!r}: {exc}", param) from None
    if address.local.startswith('"') or address.is_ip_literal:
        raise ComposeError(f"{text!r}: quoted local parts and IP literals are not accepted",
                           param)
    parsed = email.utils.getaddresses([text])
    if len(parsed) != 1 or parsed[0][1].lower() != str(address).lower():
        raise ComposeError(f"{text!r} does not read as one address", param)
    return Mailbox(address, name)


def parse_mailbox_list(values: str | list[str] | None, param: str) -> list[Mailbox]:
    if values is None:
        return []
    items = [values] if isinstance(values, str) else values
    return [parse_mailbox_text(item, f"{param}[{n}]" if not isinstance(values, str) else param)
            for n, item in enumerate(items)]


def compose(draft: Draft, now: datetime | None = None) -> tuple[bytes, str]:
    """(the message as CRLF bytes, its Message-ID without <>)."""
    if draft.text is None and draft.html is None:
        raise ComposeError("give text or html, or both", "text")
    if not draft.recipients:
        raise ComposeError("give at least one recipient", "to")
    _check_header_text(draft.subject, "subject")
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = draft.sender.header()
    for name, boxes in (("To", draft.to), ("Cc", draft.cc), ("Reply-To", draft.reply_to)):
        if boxes:
            msg[name] = [box.header() for box in boxes]
    msg["Subject"] = draft.subject
    msg["Date"] = email.utils.format_datetime(now or datetime.now(UTC))
    # Random, not make_msgid's time and process id: a Message-ID tells nothing of the server.
    message_id = f"<{secrets.token_urlsafe(18)}@{draft.sender.address.domain}>"
    msg["Message-ID"] = message_id
    if draft.in_reply_to:
        msg["In-Reply-To"] = f"<{draft.in_reply_to}>"
    if draft.references:
        msg["References"] = " ".join(f"<{ref}>" for ref in draft.references)
    for name, value in draft.headers.items():
        _check_extra_header(name, value)
        msg[name] = value
    _set_body(msg, draft)
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]  # the email package repeats it in parts it makes
    return msg.as_bytes(policy=_POLICY), message_id[1:-1]


def reply_subject(subject: str) -> str:
    """`Re: ` once, however many the original carried (RFC 5322 3.6.5)."""
    stripped = re.sub(r"^(?:\s*(?:re|aw|sv)\s*:\s*)+", "", subject, flags=re.IGNORECASE)
    return f"Re: {stripped}"


def forward_subject(subject: str) -> str:
    stripped = re.sub(r"^(?:\s*(?:fwd?|wg)\s*:\s*)+", "", subject, flags=re.IGNORECASE)
    return f"Fwd: {stripped}"


def _set_body(msg: EmailMessage, draft: Draft) -> None:
    inline = [a for a in draft.attachments if a.inline]
    attached = [a for a in draft.attachments if not a.inline]
    if draft.text is not None:
        msg.set_content(draft.text)
    if draft.html is not None:
        if draft.text is not None:
            msg.add_alternative(draft.html, subtype="html")
        else:
            msg.set_content(draft.html, subtype="html")
    if inline:
        # Inline parts belong beside the HTML that refers to them by Content-ID.
        html_part = msg.get_body(("html",)) or msg
        if html_part is msg:
            msg.make_related()
        else:
            html_part.make_related()
        target = msg if html_part is msg else html_part
        for n, part in enumerate(inline):
            _attach(target, part, f"attachments[{n}]", related=True)
    for n, part in enumerate(attached):
        _attach(msg, part, f"attachments[{len(inline) + n}]", related=False)


def _attach(msg: EmailMessage, part: Attachment, param: str, related: bool) -> None:
    maintype, _, subtype = part.content_type.partition("/")
    if not (re.fullmatch(r"[A-Za-z0-9!#$&^_.+-]{1,64}", maintype)
            and re.fullmatch(r"[A-Za-z0-9!#$&^_.+-]{1,64}", subtype)):
        raise ComposeError(f"{part.content_type!r} is not a media type", f"{param}.content_type")
    _check_header_text(part.filename, f"{param}.filename")
    cid = None
    if part.content_id is not None:
        _check_header_text(part.content_id, f"{param}.content_id")
        if not re.fullmatch(r"[\x21-\x3b\x3d\x3f-\x7e]{1,200}", part.content_id):
            raise ComposeError("a content_id is printable ASCII without <>", f"{param}.content_id")
        cid = f"<{part.content_id}>"
    if related and cid is None:
        raise ComposeError("an inline attachment needs a content_id", f"{param}.content_id")
    add = msg.add_related if related else msg.add_attachment
    add(part.content, maintype=maintype, subtype=subtype, filename=part.filename,
        disposition="inline" if part.inline else "attachment", cid=cid)


def _check_header_text(value: str, param: str) -> None:
    if any((unicodedata.category(c) == "Cc" and c != "\t") or c in "\u2028\u2029"
           for c in value):
        raise ComposeError("line breaks and control characters are not allowed here", param)
    if len(value) > MAX_HEADER_VALUE:
        raise ComposeError(f"longer than {MAX_HEADER_VALUE} characters", param)


def _check_extra_header(name: str, value: str) -> None:
    param = f"headers.{name}"
    if not _FIELD_NAME.fullmatch(name):
        raise ComposeError(f"{name!r} is not a header field name", param)
    if name.lower() in OWN_FIELDS or name.lower().startswith("content-"):
        raise ComposeError(f"{name} is set by the server", param)
    _check_header_text(value, param)
