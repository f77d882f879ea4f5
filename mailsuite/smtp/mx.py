"""The inbound MX: mail for our domains only, checked, and stored durably before the 250.

Policy lives here (who may receive, relay refusal, loop limits); the protocol machinery is
server.ESMTPServer; storing is the store's.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import dns.resolver
from twisted.internet import defer, threads
from twisted.logger import Logger

from mailsuite.addresses import Address
from mailsuite.config import Config
from mailsuite.mime import count_fields, has_field, remove_fields
from mailsuite.smtp import authresults
from mailsuite.smtp.server import ESMTPServer, ESMTPServerFactory, Reply, Transaction
from mailsuite.store import AsyncStore, Delivery, Resolution
from mailsuite.store.batcher import Batcher
from mailsuite.structure import imap_structure

log = Logger(namespace="mailsuite.mx")


@dataclass
class MXContext:
    """What every MX session needs besides the listener settings."""

    config: Config
    store: AsyncStore
    deliveries: Batcher[Delivery]
    resolver: dns.resolver.Resolver
    reactor: Any
    #: recent local answers, address -> (resolution, expiry); only positive ones, so a user
    #: added a moment ago is never refused, and one removed is refused within seconds
    recipients: dict[str, tuple[Resolution, float]] = field(default_factory=dict)

    RECIPIENT_TTL = 5.0

    def cached_recipient(self, address: str) -> Resolution | None:
        hit = self.recipients.get(address)
        if hit is None or hit[1] < time.monotonic():
            self.recipients.pop(address, None)
            return None
        return hit[0]

    def remember_recipient(self, address: str, resolution: Resolution) -> None:
        if resolution.kind == "local":
            if len(self.recipients) > 10000:
                self.recipients.clear()
            self.recipients[address] = (resolution, time.monotonic() + self.RECIPIENT_TTL)


class MXFactory(ESMTPServerFactory):
    def __init__(self, context: MXContext, tls_options: Any | None) -> None:
        super().__init__(context.config.server.hostname, context.config.smtp, tls_options,
                         clock=context.reactor)
        self.context = context

    def buildProtocol(self, addr: Any) -> MXServer:
        proto = MXServer(self.context)
        proto.factory = self
        return proto


class MXServer(ESMTPServer):
    service_name = "ESMTP"

    def __init__(self, context: MXContext) -> None:
        super().__init__()
        self.context = context
        self._spf: defer.Deferred | None = None

    # --- MAIL FROM -----------------------------------------------------------------------
    def check_sender(self, txn: Transaction) -> Reply:
        if self.context.config.mx.auth_checks:
            recent = authresults.recent_spf(self.peer_ip, txn.sender_text, self.helo or "")
            if recent is not None:
                self._spf = defer.succeed(recent)  # no thread trip for a known answer
                return Reply(250, "2.1.0", "Ok")
            # SPF needs only the envelope: start it now, collect it after DATA.
            self._spf = self._run(authresults.check_spf, self.peer_ip, txn.sender_text,
                                  self.helo or "", self.context.config.dns.timeout)
            self._spf.addErrback(lambda f: authresults.SPFOutcome("temperror", str(f.value)))
        return Reply(250, "2.1.0", "Ok")

    # --- RCPT TO -------------------------------------------------------------------------
    def check_recipient(self, txn: Transaction, address: Address) -> Any:
        if address.is_ip_literal:
            return self._relay_denied(address)
        cached = self.context.cached_recipient(address.normal)
        if cached is not None:
            return self._resolved(cached, address)
        d = self.context.store.resolve(address.normal)
        d.addCallback(self._resolved, address)
        return d

    def _resolved(self, resolution: Resolution, address: Address) -> tuple[Reply, Any]:
        self.context.remember_recipient(address.normal, resolution)
        if resolution.kind == "foreign":
            return self._relay_denied(address)
        if resolution.kind == "unknown":
            self._reject_event("unknown recipient", address)
            return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: "
                                       "user unknown"), None
        if resolution.kind == "external":
            return Reply(451, "4.3.0", f"<{address}>: forwarding outside this server is not "
                                       "available yet, try again later"), None
        return Reply(250, "2.1.5", "Ok"), resolution.account_ids

    def _relay_denied(self, address: Address) -> tuple[Reply, None]:
        self._reject_event("relay denied", address)
        return Reply(554, "5.7.1", f"<{address}>: Relay access denied"), None

    def _reject_event(self, reason: str, address: Address) -> None:
        detail = {"reason": reason, "recipient": str(address), "peer": self.peer_ip,
                  "sender": self.transaction.sender_text if self.transaction else ""}
        self.context.store.record_event("rejected", detail).addErrback(
            lambda f: log.failure("recording a rejection failed", failure=f))

    # --- DATA ----------------------------------------------------------------------------
    def accept_message(self, txn: Transaction, raw: bytes) -> Any:
        limit = self.context.config.smtp.max_received_headers
        if count_fields(raw, "Received") >= limit:
            return Reply(554, "5.4.6", f"Mail loop detected: {limit} Received headers")
        spf = self._spf or defer.succeed(authresults.SPFOutcome("none", "checks disabled"))
        self._spf = None
        queue_id = secrets.token_hex(6)
        trace = self._trace_headers(txn, queue_id)
        # Everything CPU- or DNS-bound about the message happens in one trip to a thread.
        d = spf.addCallback(lambda outcome: self._run(self._prepare, raw, trace, txn.sender_text,
                                                      outcome))
        d.addCallback(self._store, txn, queue_id)
        return d

    def _prepare(self, raw: bytes, trace: bytes, sender: str,
                 spf: authresults.SPFOutcome) -> tuple[bytes, tuple[bytes, bytes, bytes]]:
        """In a thread: the message as stored, and its IMAP structure."""
        hostname = self.context.config.server.hostname
        # An Authentication-Results that claims to be ours but came from outside is forged.
        if has_field(raw, "Authentication-Results"):
            raw = remove_fields(raw, lambda f: f.name.lower() == "authentication-results"
                                and _authserv_id(f.value) == hostname.lower())
        if self.context.config.mx.auth_checks:
            header = authresults.authentication_results(
                raw, hostname, self.context.resolver, self.peer_ip, self.helo or "", sender, spf)
            raw = header.encode("utf-8") + b"\r\n" + raw
        full = trace + raw
        # IMAP's ENVELOPE and BODYSTRUCTURE are made once, here, and kept with the message.
        return full, imap_structure(full)

    def _store(self, prepared: tuple[bytes, tuple[bytes, bytes, bytes]], txn: Transaction,
               queue_id: str) -> defer.Deferred:
        full, structure = prepared
        account_ids = sorted({a for _, ids in txn.recipients for a in ids})
        detail = {"queue_id": queue_id, "sender": txn.sender_text, "peer": self.peer_ip,
                  "recipients": [str(a) for a, _ in txn.recipients]}
        d = self.context.deliveries.submit(Delivery(
            raw=full, account_ids=tuple(account_ids), detail=detail, structure=structure))
        d.addCallbacks(
            lambda _: Reply(250, "2.0.0", f"Ok: queued as {queue_id}"),
            self._store_failed, errbackArgs=(queue_id,))
        return d

    def _store_failed(self, failure: Any, queue_id: str) -> Reply:
        log.failure("storing message {queue_id} failed", failure=failure, queue_id=queue_id)
        return Reply(451, "4.3.0", "Error: could not store the message, try again later")

    def _trace_headers(self, txn: Transaction, queue_id: str) -> bytes:
        protocol = ("UTF8SMTP" if txn.smtputf8 else "ESMTP") if self.esmtp else "SMTP"
        if self.tls:
            protocol += "S"
        recipient = f"\r\n\tfor <{txn.recipients[0][0]}>" if len(txn.recipients) == 1 else ""
        received = (
            f"Received: from {self.helo} ([{self.peer_ip}])\r\n"
            f"\tby {self.context.config.server.hostname} (mailsuite) with {protocol} "
            f"id {queue_id}{recipient};\r\n\t{email.utils.formatdate(localtime=False)}\r\n"
        )
        return f"Return-Path: <{txn.sender_text}>\r\n{received}".encode()

    def _run(self, fn: Any, *args: Any) -> defer.Deferred:
        """CPU- and DNS-bound checks run in the reactor's general thread pool."""
        reactor = self.context.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


def _authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value (RFC 8601 2.2), lower-cased.

    Comments (RFC 5322 CFWS) may nest and hold escaped parentheses; they are skipped.
    """
    kept = []
    depth = 0
    escaped = False
    for char in value:
        if char == ";" and not depth:
            break
        if escaped:
            escaped = False
        elif char == "\\" and depth:
            escaped = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            kept.append(char)
            continue
        kept.append(" ")
    words = "".join(kept).split()
    return words[0].lower() if words else ""
