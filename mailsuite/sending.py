"""One sending pipeline for SMTP submission and the HTTP API: the sender policy on From:,
the header a submission server completes, the DKIM signature, and the split into local copies
and queued recipients, committed together. Protocol-neutral: it imports no listener.

prepare() is CPU work (signing): call it in a thread.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import dkim as dkimpy

from mailsuite import dkim
from mailsuite.addresses import Address, mentioned_addresses
from mailsuite.mime import has_field, header_fields, split_message
from mailsuite.store import (
    AccountRow,
    Delivery,
    Outbound,
    Resolution,
    SenderIdentities,
    Store,
    Submission,
)
from mailsuite.structure import imap_structure


@dataclass(frozen=True)
class Refused:
    """Why a message cannot be sent, as an SMTP reply says it."""

    code: int
    status: str
    text: str


@dataclass(frozen=True)
class Outgoing:
    """A message an authenticated account sends, and where each recipient leads."""

    account: AccountRow
    identities: SenderIdentities
    raw: bytes
    envelope_from: str
    recipients: list[tuple[Address, Resolution]]
    queue_id: str
    hostname: str
    via: str  # "submission" or "api"
    smtputf8: bool = False
    #: also keep a \Seen copy in the sender's Sent folder (an SMTP client saves its own)
    sent_copy: bool = False


def _from_fields(raw: bytes) -> tuple[list[str], list[str]]:
    """The From: field values and the addresses in them."""
    header, _ = split_message(raw)
    # Read the way receivers read it: "From :" (RFC 5322 4.5 obsolete syntax) counts.
    fields = [f.value for f in header_fields(header) if f.name.strip().lower() == "from"]
    return fields, [address for _, address in email.utils.getaddresses(fields)]


def check_from(fields: list[str], senders: list[str], identities: SenderIdentities,
               account: str) -> Refused | None:
    """The sender policy: one From: field, every address in it one the account may use, and
    no address of anyone else in its display names or comments."""
    if len(fields) > 1:
        return Refused(550, "5.6.0", "Message refused: more than one From: header "
                                     "(RFC 5322 3.6)")
    if not senders or not all("@" in a for a in senders):
        return Refused(550, "5.6.0", "Message refused: it needs a From: header with an "
                                     "address (RFC 5322 3.6.2)")
    for address in senders:
        if not identities.allows(address):
            return Refused(553, "5.7.1", f"From: <{address}> is not an address of user "
                                         f"{account}")
    # A display name or comment that reads as someone else's address is what a reader sees
    # first ("alice@example.test(<ceo@bank.test>"): only the user's own may appear.
    if not all(identities.allows(mentioned)
               for value in fields for mentioned in mentioned_addresses(value)):
        return Refused(553, "5.7.1", "From: its display name or a comment names an address "
                                     f"that is not one of user {account}")
    return None


class SigningKeys:
    """A domain's active DKIM keys, cached a minute (a rotation shows soon); blocking."""

    TTL = 60.0

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[list[dkim.DKIMKey], float]] = {}

    def get(self, domain: str) -> list[dkim.DKIMKey]:
        hit = self._cache.get(domain)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        keys = [dkim.DKIMKey(k.domain, k.selector, k.algorithm, k.private_key)
                for k in self.store.dkim_keys(domain)]
        self._cache[domain] = (keys, time.monotonic() + self.TTL)
        return keys


def prepare(out: Outgoing, keys: SigningKeys, received: bytes) -> Submission | Refused:
    """Check, complete (RFC 6409 8: Date, Message-ID), sign with the From: domain's keys, and
    split by destination."""
    fields, senders = _from_fields(out.raw)
    refused = check_from(fields, senders, out.identities, out.account.address)
    if refused is not None:
        return refused
    extra = b""
    if not has_field(out.raw, "Date"):
        now = email.utils.format_datetime(datetime.now(UTC))  # +0000, not "no zone" -0000
        extra += f"Date: {now}\r\n".encode()
    if not has_field(out.raw, "Message-ID"):
        extra += f"Message-ID: <{secrets.token_hex(12)}@{out.hostname}>\r\n".encode()
    try:
        signed = dkim.sign_message(extra + out.raw,
                                   keys.get(senders[0].rpartition("@")[2].lower()))
    except dkimpy.DKIMException as exc:
        return Refused(550, "5.6.0", f"Message refused: malformed header section ({exc})")
    message = received + signed
    local: list[int] = []
    remote: list[str] = []
    for address, resolution in out.recipients:
        if resolution.kind == "foreign":
            remote.append(str(address))
        else:
            local.extend(resolution.account_ids)
            remote.extend(resolution.external)
    detail = {"queue_id": out.queue_id, "sender": out.envelope_from, "via": out.via,
              "user": out.account.address}
    delivery = outbound = sent = None
    if local:
        copy = f"Return-Path: <{out.envelope_from}>\r\n".encode() + message
        delivery = Delivery(raw=copy, account_ids=tuple(sorted(set(local))), detail=detail,
                            structure=imap_structure(copy))
    if remote:
        outbound = Outbound(
            sender=out.envelope_from, recipients=tuple(dict.fromkeys(remote)), raw=message,
            return_to=out.envelope_from, account_id=out.account.id, kind="submission",
            smtputf8=out.smtputf8 or not all(a.isascii() for a in remote), detail=detail)
    if out.sent_copy:
        sent = Delivery(raw=signed, account_ids=(out.account.id,), detail=detail,
                        mailbox="Sent", flags="\\Seen", structure=imap_structure(signed),
                        event="sent")
    return Submission(out.queue_id, delivery, outbound, sent)

