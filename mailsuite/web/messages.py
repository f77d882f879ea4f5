"""Sending over the API: the message is composed from JSON, then goes through the same
pipeline as SMTP submission (sender policy, DKIM, local copies and the queue, committed
together), plus a \\Seen copy in the inbox's Sent folder, as a mail client would keep."""

from __future__ import annotations

import base64
import binascii
import email.utils
from datetime import UTC, datetime

from twisted.internet import threads

from mailsuite import compose, metrics, sending
from mailsuite.addresses import Address
from mailsuite.store import Resolution, new_queue_id
from mailsuite.web.api import Api, ApiError, Call, request_id
from mailsuite.web.inboxes import reached_inbox
from mailsuite.web.models import RecipientStatus, SendRequest, SendResult

#: recipients in one of to, cc or bcc; [smtp] max_recipients bounds them all together
MAX_PER_FIELD = 50


def _draft(sender: compose.Mailbox, body: SendRequest) -> compose.Draft:
    try:
        fields = {name: compose.parse_mailbox_list(getattr(body, name), name)
                  for name in ("to", "cc", "bcc", "reply_to")}
    except compose.ComposeError as exc:
        raise ApiError(400, "invalid_address", str(exc), exc.param) from None
    for name in ("to", "cc", "bcc"):
        if len(fields[name]) > MAX_PER_FIELD:
            raise ApiError(400, "too_many_recipients",
                           f"at most {MAX_PER_FIELD} addresses in {name}", name)
    attachments = []
    for n, part in enumerate(body.attachments):
        try:
            content = base64.b64decode(part.content, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "invalid_body", "not base64",
                           f"attachments[{n}].content") from None
        attachments.append(compose.Attachment(part.filename, part.content_type, content,
                                              part.content_id, part.inline))
    return compose.Draft(sender=sender, to=fields["to"], cc=fields["cc"], bcc=fields["bcc"],
                         reply_to=fields["reply_to"], subject=body.subject, text=body.text,
                         html=body.html, attachments=attachments, headers=body.headers)


def _compose(draft: compose.Draft) -> tuple[bytes, str]:
    try:
        return compose.compose(draft)
    except compose.ComposeError as exc:
        raise ApiError(400, "invalid_body", str(exc), exc.param) from None


def register(api: Api) -> None:
    @api.operation("POST", "/v1/inboxes/{inbox}/messages/send", scope="messages:send",
                   status=202, body=SendRequest, response=SendResult, tag="messages",
                   errors={422: "a recipient is unknown here or suppressed after a hard "
                           "bounce (recipient_unknown, recipient_suppressed); nothing is sent",
                           503: "the message could not be committed; nothing is sent"},
                   summary="Send from this inbox: local recipients get it at once, remote "
                   "ones through the queue (DKIM-signed); a copy lands in Sent")
    async def send_message(call: Call, body: SendRequest) -> SendResult:
        inbox = await reached_inbox(call, call.params["inbox"])
        account = await call.store.account_get(inbox.address)
        if account is None:
            raise ApiError(404, "not_found", "no such inbox")
        local, _, domain = inbox.address.rpartition("@")
        sender = compose.Mailbox(Address(local, domain), inbox.display_name or "")
        draft = _draft(sender, body)
        recipients = draft.recipients
        if len(recipients) > call.config.smtp.max_recipients:
            raise ApiError(400, "too_many_recipients",
                           f"at most {call.config.smtp.max_recipients} recipients", "to")
        raw, message_id = await threads.deferToThread(_compose, draft)
        if len(raw) > call.config.smtp.max_message_size:
            raise ApiError(400, "message_too_large", f"the message is {len(raw)} octets; at "
                           f"most {call.config.smtp.max_message_size}", "attachments")
        routes: list[tuple[Address, Resolution]] = []
        unknown, suppressed = [], []
        for address in recipients:
            resolution, reason = await call.store.route_recipient(address.normal)
            if resolution.kind == "unknown":
                unknown.append(str(address))
            elif reason is not None:
                suppressed.append(str(address))
            routes.append((address, resolution))
        if unknown:
            raise ApiError(422, "recipient_unknown", "no such local address: "
                           + ", ".join(unknown), "to")
        if suppressed:
            raise ApiError(422, "recipient_suppressed", "suppressed after a hard bounce: "
                           + ", ".join(suppressed), "to")
        queue_id = new_queue_id()
        received = (f"Received: by {call.config.server.hostname} (mailsuite) with HTTP id "
                    f"{queue_id} ({request_id(call.request)});\r\n"
                    f"\t{email.utils.format_datetime(datetime.now(UTC))}\r\n").encode()
        outgoing = sending.Outgoing(
            account=account, identities=await call.store.sender_identities(account.id),
            raw=raw, envelope_from=inbox.address, recipients=routes, queue_id=queue_id,
            hostname=call.config.server.hostname, via="api",
            smtputf8=not all(a.is_ascii for a in recipients), sent_copy=True)
        prepared = await threads.deferToThread(sending.prepare, outgoing,
                                               call.services.signing_keys, received)
        if isinstance(prepared, sending.Refused):
            raise ApiError(422, "sender_refused", prepared.text)
        [result] = await call.store.submit_many([prepared],
                                                timeout=call.config.smtp.commit_timeout)
        if isinstance(result, Exception):
            raise ApiError(503, "unavailable", "the message could not be stored; nothing was "
                           "sent, try again")
        metrics.MESSAGES.labels("sent").inc()
        if prepared.outbound is not None:
            call.services.queued()
        return SendResult(queue_id=queue_id, message_id=message_id, status="queued",
                          recipients=[RecipientStatus(
                              address=str(address),
                              status="queued" if resolution.kind == "foreign"
                              or resolution.external else "delivered")
                              for address, resolution in routes])
