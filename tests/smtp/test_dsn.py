"""Bounces (RFC 3464 delivery status notifications inside RFC 6522 multipart/report)."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import pytest

from mailsuite.smtp.dsn import FailedRecipient, build_bounce, is_auto_reply

NOW = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)
ORIGINAL = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net, carol@example.com\r\n"
    b"Subject: plans for Friday\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"The secret body that must not come back.\r\n"
)
BOB = FailedRecipient(
    recipient="bob@example.net",
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@example.net>: Recipient address rejected: no such user",
    remote_mta="mx1.example.net",
    last_attempt=NOW - timedelta(minutes=1),
)
CAROL = FailedRecipient(
    recipient="carol@example.com",
    status="4.4.7",
    diagnostic="connect to mx.example.com[192.0.2.7]:25: Connection timed out",
    remote_mta=None,
    last_attempt=NOW - timedelta(minutes=5),
)


def bounce(**overrides) -> bytes:  # type: ignore[no-untyped-def]
    arguments = dict(
        reporting_mta="mail.example.org",
        original_sender="alice@example.org",
        original=ORIGINAL,
        recipients=[BOB, CAROL],
        arrival_date=NOW - timedelta(days=1),
        queue_id="Q1234ABC",
        now=NOW,
    )
    arguments.update(overrides)
    return build_bounce(**arguments)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def status_blocks(message: EmailMessage) -> list[email.message.Message]:
    report = list(message.iter_parts())[1]
    assert report.get_content_type() == "message/delivery-status"
    return list(report.get_payload())


def test_structure_and_top_header() -> None:
    raw = bounce()
    message = parse(raw)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers",
    ]
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.org>"
    assert message["To"].addresses[0].addr_spec == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert re.fullmatch(r"<[^@<>\s]+@mail\.example\.org>", message["Message-ID"])
    assert message["Date"].datetime == NOW
    assert not message.defects


def test_delivery_status_fields() -> None:
    per_message, bob, carol = status_blocks(parse(bounce()))
    assert per_message["Reporting-MTA"] == "dns; mail.example.org"
    assert per_message["X-Mailsuite-Queue-ID"] == "Q1234ABC"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == NOW - timedelta(days=1)

    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.example.net"
    assert bob["Diagnostic-Code"] == f"smtp; {BOB.diagnostic}"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]) == BOB.last_attempt

    assert carol["Final-Recipient"] == "rfc822; carol@example.com"
    assert carol["Status"] == "4.4.7"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == f"X-Mailsuite; {CAROL.diagnostic}"


def test_delivery_status_part_parses_on_its_own() -> None:
    raw = bounce()
    # The part's body as a separate text: field groups separated by blank lines.
    body = raw.split(b"Content-Type: message/delivery-status\r\n\r\n", 1)[1].split(b"\r\n--")[0]
    groups = [email.parser.BytesHeaderParser().parsebytes(g) for g in body.split(b"\r\n\r\n")]
    assert [g["Final-Recipient"] for g in groups[1:]] == [
        "rfc822; bob@example.net", "rfc822; carol@example.com",
    ]


def test_human_part_names_recipients_and_replies() -> None:
    text = list(parse(bounce()).iter_parts())[0].get_content()
    flat = " ".join(text.split())
    assert "<bob@example.net>: host mx1.example.net said: 550 5.1.1" in flat
    assert "no such user" in flat
    assert "<carol@example.com>: connect to mx.example.com[192.0.2.7]:25" in flat


def test_original_headers_without_body() -> None:
    part = list(parse(bounce()).iter_parts())[2]
    content = part.get_content()
    assert "Subject: plans for Friday" in content
    assert "Message-ID: <orig-1@example.org>" in content
    assert b"secret body" not in bounce()


def test_seven_bit_crlf_and_short_lines() -> None:
    long_reply = "550-5.7.1 first line\r\n550 5.7.1 " + "x" * 3000
    raw = bounce(recipients=[BOB, FailedRecipient(
        recipient="dave@example.com", status="5.7.1", diagnostic=long_reply,
        remote_mta="mx.example.com", last_attempt=NOW,
    )])
    raw.decode("ascii")
    assert re.search(rb"(?<!\r)\n", raw) is None
    assert re.search(rb"\r(?!\n)", raw) is None
    assert max(len(line) for line in raw.split(b"\r\n")) < 998


def test_diagnostic_is_sanitised() -> None:
    nasty = FailedRecipient(
        recipient="erin@example.com", status="5.0.0",
        diagnostic="550 nope\r\nX-Injected: yes\r\n\r\nbody? Grüße\x00",
        remote_mta="mx.example.com\r\nX-Also: injected", last_attempt=NOW,
    )
    raw = bounce(recipients=[nasty])
    raw.decode("ascii")
    assert b"\r\nX-Injected" not in raw
    assert b"\r\nX-Also" not in raw
    (_, erin) = status_blocks(parse(raw))
    assert erin["Diagnostic-Code"] == "smtp; 550 nope X-Injected: yes body? Gr??e"


def test_expired_wording() -> None:
    message = parse(bounce(expired=True, recipients=[CAROL]))
    assert "Delivery time expired" in message["Subject"]
    text = list(message.iter_parts())[0].get_content()
    assert "expired" in text


def test_non_ascii_original_headers_are_base64() -> None:
    original = "From: Jörg <jörg@example.org>\r\nSubject: Grüße\r\n\r\nKörper\r\n".encode()
    raw = bounce(original=original)
    raw.decode("ascii")
    part = list(parse(raw).iter_parts())[2]
    assert part["Content-Transfer-Encoding"] == "base64"
    headers = "From: Jörg <jörg@example.org>\r\nSubject: Grüße\r\n".encode()
    assert part.get_payload(decode=True) == headers
    assert "Subject: Grüße" in part.get_content()


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    rcpt = FailedRecipient(recipient="zoë+list@bücher.example", status="5.1.1",
                           diagnostic="550 no such user", remote_mta="mx.example",
                           last_attempt=NOW)
    raw = bounce(recipients=[rcpt])
    raw.decode("ascii")
    (_, block) = status_blocks(parse(raw))
    assert block["Final-Recipient"] == r"utf-8; zo\x{EB}\x{2B}list@b\x{FC}cher.example"
    text = list(parse(raw).iter_parts())[0].get_content()
    assert "<zoë+list@bücher.example>" in text


def test_null_sender_is_refused() -> None:
    with pytest.raises(ValueError):
        bounce(original_sender="")


def test_is_auto_reply() -> None:
    assert is_auto_reply(bounce())
    assert not is_auto_reply(ORIGINAL)
    assert not is_auto_reply(b"Auto-Submitted: no\r\nSubject: hi\r\n\r\nbody\r\n")
    assert is_auto_reply(b"Auto-Submitted: auto-generated\r\nSubject: hi\r\n\r\nbody\r\n")
    assert is_auto_reply(
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n"
    )
    # A header only mentioned in the body does not count.
    assert not is_auto_reply(b"Subject: hi\r\n\r\nAuto-Submitted: auto-replied\r\n")
