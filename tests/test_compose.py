"""Composing messages from API input: MIME structure, encodings, and the refusals that stop
header and envelope injection. Pure; parsed back with the email package to check."""

from __future__ import annotations

import email
import email.utils
from datetime import UTC, datetime
from email import policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsuite.compose import (
    Attachment,
    ComposeError,
    Draft,
    Mailbox,
    compose,
    forward_subject,
    parse_mailbox_list,
    parse_mailbox_text,
    reply_subject,
)

SENDER = parse_mailbox_text("Agent Ünïcode <agent@example.org>", "from")


def parsed(raw: bytes) -> email.message.EmailMessage:
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    return email.message_from_bytes(raw, policy=policy.default)


def text_of(part: email.message.EmailMessage) -> str:
    """A text part's content with the wire's CRLF line ends as \\n."""
    return part.get_content().replace("\r\n", "\n")


def draft(**kw: object) -> Draft:
    base: dict = {"sender": SENDER, "to": parse_mailbox_list("bob@example.net", "to"),
                  "subject": "hello"}
    base.update(kw)
    return Draft(**base)


def test_text_only_is_one_7bit_text_part_with_date_and_message_id() -> None:
    raw, message_id = compose(draft(text="Grüße\n" + "x" * 2000),
                              now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert raw.isascii()
    msg = parsed(raw)
    assert msg.get_content_type() == "text/plain"
    assert text_of(msg) == "Grüße\n" + "x" * 2000 + "\n"
    assert msg["Message-ID"] == f"<{message_id}>" and message_id.endswith("@example.org")
    assert msg["Date"] == "Fri, 02 Jan 2026 03:04:05 +0000"
    assert str(msg["From"]) == "Agent Ünïcode <agent@example.org>"
    assert b"MIME-Version" in raw and raw.count(b"MIME-Version") == 1


def test_text_and_html_with_inline_image_and_attachment_nest_as_mail_clients_expect() -> None:
    raw, _ = compose(draft(
        subject="Übersicht für März",
        text="plain", html='<p>see <img src="cid:logo@x"></p>',
        attachments=[Attachment("Bericht März.pdf", "application/pdf", b"%PDF"),
                     Attachment("logo.png", "image/png", b"\x89PNG", "logo@x", inline=True)]))
    msg = parsed(raw)
    assert str(msg["Subject"]) == "Übersicht für März"
    assert msg.get_content_type() == "multipart/mixed"
    alternative, pdf = msg.get_payload()
    assert alternative.get_content_type() == "multipart/alternative"
    text, related = alternative.get_payload()
    assert text_of(text) == "plain\n"
    assert related.get_content_type() == "multipart/related"
    html, logo = related.get_payload()
    assert html.get_content_type() == "text/html"
    assert logo["Content-ID"] == "<logo@x>" and logo.get_content() == b"\x89PNG"
    assert logo.get_content_disposition() == "inline"
    assert pdf.get_filename() == "Bericht März.pdf" and pdf.get_content() == b"%PDF"
    assert b"filename*=utf-8''Bericht%20M%C3%A4rz.pdf" in raw


def test_recipients_are_to_cc_bcc_once_and_bcc_is_not_in_the_header() -> None:
    d = draft(cc=parse_mailbox_list(["Carol <carol@example.net>", "BOB@example.net"], "cc"),
              bcc=parse_mailbox_list(["secret@example.com"], "bcc"), text="x")
    assert [str(a) for a in d.recipients] == ["bob@example.net", "carol@example.net",
                                              "secret@example.com"]
    raw, _ = compose(d)
    assert b"secret@example.com" not in raw and b"Bcc" not in raw


@pytest.mark.parametrize("text", [
    "a@x)<b@y>", "a@x.test, b@y.test", "Alice <a@x.test>, <b@y.test>", "<a@x.test> b@y.test",
    "alice@example.test(<ceo@bank.test>", "ceo@bank.test <alice@example.test>",
    "\"ceo@bank.test\" <alice@example.test>", "Bob\r\nBcc: x@y.test <bob@example.net>",
    "bob@example.net\n", "no-at-sign", "a@[127.0.0.1]", '"quoted"@example.net', "",
    "Name (comment) <a@x.test>", "a@x.test (comment)",
])
def test_addresses_that_could_be_read_two_ways_are_refused(text: str) -> None:
    with pytest.raises(ComposeError) as caught:
        parse_mailbox_text(text, "to")
    assert caught.value.param == "to"


@pytest.mark.parametrize("field", ["subject", "headers.X-Tag", "headers.Bcc",
                                   "headers.Content-Type", "headers.Bad Name"])
def test_header_injection_is_refused(field: str) -> None:
    if field == "subject":
        bad = draft(text="x", subject="hi\r\nBcc: victim@example.com")
    else:
        name = field.split(".", 1)[1]
        bad = draft(text="x", headers={name: "v\r\nBcc: victim@example.com"
                                       if name == "X-Tag" else "v"})
    with pytest.raises(ComposeError) as caught:
        compose(bad)
    assert caught.value.param == field


def test_missing_body_or_recipients_and_inline_without_cid_are_refused() -> None:
    with pytest.raises(ComposeError, match="text or html"):
        compose(draft())
    with pytest.raises(ComposeError, match="recipient"):
        compose(draft(to=[], text="x"))
    with pytest.raises(ComposeError) as caught:
        compose(draft(html="<p>", attachments=[Attachment("a.png", "image/png", b"x",
                                                          inline=True)]))
    assert caught.value.param == "attachments[0].content_id"
    with pytest.raises(ComposeError):
        compose(draft(text="x", attachments=[Attachment("a", "not a type", b"x")]))


def test_reply_and_forward_subjects_get_one_prefix() -> None:
    assert reply_subject("Re: RE: re:  Lunch") == "Re: Lunch"
    assert reply_subject("Lunch") == "Re: Lunch"
    assert forward_subject("Fwd: FW: Lunch") == "Fwd: Lunch"


def test_replies_carry_in_reply_to_and_references() -> None:
    raw, _ = compose(draft(text="x", in_reply_to="orig@example.net",
                           references=["root@example.net", "orig@example.net"]))
    msg = parsed(raw)
    assert msg["In-Reply-To"] == "<orig@example.net>"
    assert msg["References"] == "<root@example.net> <orig@example.net>"


_printable = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(_printable)
def test_fuzz_an_accepted_address_reads_the_same_to_email_utils(text: str) -> None:
    try:
        box = parse_mailbox_text(text, "to")
    except ComposeError:
        return
    assert "\r" not in text and "\n" not in text
    (name, address), = email.utils.getaddresses([text])
    assert address.lower() == str(box.address).lower()


@settings(max_examples=100, deadline=None)
@given(subject=_printable, text=_printable, name=st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30))
def test_fuzz_whatever_is_accepted_composes_to_clean_7bit_mail(subject: str, text: str,
                                                               name: str) -> None:
    try:
        sender = parse_mailbox_text(f"{name} <agent@example.org>" if name.strip() else
                                    "agent@example.org", "from")
        raw, _ = compose(Draft(sender=sender, to=[Mailbox(sender.address)], subject=subject,
                               text=text))
    except ComposeError:
        return
    assert raw.isascii()
    msg = parsed(raw)
    assert " ".join(str(msg["Subject"]).split()) == " ".join(subject.split())
    assert text_of(msg).rstrip("\n") == \
        text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
