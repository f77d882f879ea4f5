"""The inbound MX: mail for our domains only, checked, and stored durably before the 250.

Policy lives here (who may receive, relay refusal, loop limits); the protocol machinery is
server.ESMTPServer; storing is the store's.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import dns.resolver
from twisted.internet import defer, threads
from twisted.logger import Logger

from mailsuite import metrics
from mailsuite.addresses import Address
from mailsuite.config import Config, MXConfig
from mailsuite.mime import count_fields, has_field, remove_fields
from mailsuite.smtp import authresults
from mailsuite.smtp.server import (
    ESMTPServer,
    ESMTPServerFactory,
    Reply,
    Transaction,
    received_header,
)
from mailsuite.smtp.srs import SRS, SRSError
from mailsuite.store import AsyncStore, Delivery, Outbound, Resolution, Submission, new_queue_id
from mailsuite.store.batcher import Batcher
from mailsuite.structure import imap_structure

log = Logger(namespace="mailsuite.mx")


@dataclass
class MXContext:
    """What every MX session needs besides the listener settings."""

    config: Config
    store: AsyncStore
    submissions: Batcher[Submission]
    resolver: dns.resolver.Resolver
    reactor: Any
    srs: SRS
    queued: Any  # called after a commit that queued mail (wakes the delivery workers)
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

    def _resolved(self, resolution: Resolution, address: Address) -> Any:
        self.context.remember_recipient(address.normal, resolution)
        if resolution.kind == "foreign":
            return self._relay_denied(address)
        txn = self.transaction
        if SRS.is_srs(address.local) and txn is not None and txn.sender is None:
            # A bounce to an address we rewrote when forwarding (SRS); checked before
            # aliases, or a catch-all would swallow it. Only bounces (null sender) go back:
            # anything else would make a guessed hash an open relay.
            try:
                original = self.context.srs.reverse(str(address))
            except SRSError:
                self._junk += 1  # guessing hashes costs the session its junk allowance
            else:
                d = self.context.store.resolve(original.lower())
                d.addCallback(self._srs_resolved, original)
                return d
        if resolution.kind == "unknown":
            self._reject_event("unknown recipient", address)
            return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: "
                                       "user unknown"), None
        return Reply(250, "2.1.5", "Ok"), resolution

    def _srs_resolved(self, resolution: Resolution, original: str) -> tuple[Reply, Any]:
        if resolution.kind == "foreign":
            resolution = Resolution("external", (), (original,))
        elif resolution.kind == "unknown":
            return Reply(550, "5.1.1", f"<{original}>: the original sender no longer "
                                       "exists"), None
        return Reply(250, "2.1.5", "Ok"), resolution

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
        queue_id = new_queue_id()
        trace = received_header(txn, self.esmtp, self.tls, self.helo or "", self.peer_ip,
                                self.context.config.server.hostname, queue_id)
        # Everything CPU- or DNS-bound about the message happens in one trip to a thread.
        d = spf.addCallback(lambda outcome: self._run(self._prepare, raw, trace, txn.sender_text,
                                                      outcome))
        d.addCallback(self._store, txn, queue_id)
        return d

    def _prepare(self, raw: bytes, trace: bytes, sender: str,
                 spf: authresults.SPFOutcome) -> Prepared | Refusal:
        """In a thread: the checks, the policy they lead to, and the message with our trace
        fields as delivered here (with its Return-Path) and as forwarded (without: RFC 5321
        4.4 adds it at final delivery only), and the IMAP structure of the delivered copy."""
        hostname = self.context.config.server.hostname
        # An Authentication-Results that claims to be ours but came from outside is forged.
        if has_field(raw, "Authentication-Results"):
            raw = remove_fields(raw, lambda f: f.name.lower() == "authentication-results"
                                and _authserv_id(f.value) == hostname.lower())
        action = Action("accept")
        if self.context.config.mx.auth_checks:
            verdict = authresults.check_message(
                raw, hostname, self.context.resolver, self.peer_ip, self.helo or "", sender, spf)
            action = dmarc_action(verdict, self.context.config.mx, random.random())
            if action.reply is not None:
                return Refusal(action.reply, action.detail)
            raw = verdict.header.encode("utf-8") + b"\r\n" + raw
        message = trace + raw
        copy = f"Return-Path: <{sender}>\r\n".encode() + message
        # IMAP's ENVELOPE and BODYSTRUCTURE are made once, here, and kept with the message.
        return Prepared(copy, message, imap_structure(copy), action)

    def _store(self, prepared: Prepared | Refusal, txn: Transaction,
               queue_id: str) -> defer.Deferred | Reply:
        if isinstance(prepared, Refusal):
            return self._refuse(prepared, txn)
        copy, message, structure = prepared.copy, prepared.message, prepared.structure
        account_ids = sorted({a for _, res in txn.recipients for a in res.account_ids})
        forward = [(address, target) for address, res in txn.recipients
                   for target in res.external]
        detail = {"queue_id": queue_id, "sender": txn.sender_text, "peer": self.peer_ip,
                  "recipients": [str(a) for a, _ in txn.recipients], **prepared.action.detail}
        delivery = outbound = None
        if account_ids:
            quarantined = prepared.action.kind == "quarantine"
            delivery = Delivery(raw=copy, account_ids=tuple(account_ids), detail=detail,
                                structure=structure,
                                mailbox="Junk" if quarantined else "INBOX",
                                event="quarantined" if quarantined else "received")
        if forward:
            # SRS: the forward's envelope names our domain, so it passes the next hop's SPF;
            # bounces come back to us and go on to the original sender.
            sender = (self.context.srs.forward(txn.sender_text, forward[0][0].domain)
                      if txn.sender_text else "")
            targets = tuple(dict.fromkeys(target for _, target in forward))
            outbound = Outbound(sender=sender, recipients=targets, raw=message,
                                return_to=txn.sender_text, kind="forward",
                                smtputf8=txn.smtputf8 or not all(t.isascii() for t in targets),
                                detail=detail)
        d = self.context.submissions.submit(Submission(queue_id, delivery, outbound))
        d.addCallbacks(
            lambda _: self._stored(queue_id, outbound is not None),
            self._store_failed, errbackArgs=(queue_id,))
        return d

    def _refuse(self, refusal: Refusal, txn: Transaction) -> defer.Deferred:
        """The refusal's reply, once its event is recorded (so that it is counted when the
        sender hears of it); the reply goes out even if recording fails."""
        detail = {**refusal.detail, "code": refusal.reply.code, "peer": self.peer_ip,
                  "sender": txn.sender_text, "recipients": [str(a) for a, _ in txn.recipients]}
        d = self.context.store.record_event("rejected", detail)
        d.addErrback(lambda f: log.failure("recording a rejection failed", failure=f))
        d.addCallback(lambda _: refusal.reply)
        return d

    def _stored(self, queue_id: str, queued: bool) -> Reply:
        metrics.MESSAGES.labels("received").inc()
        if queued:
            self.context.queued()
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def _store_failed(self, failure: Any, queue_id: str) -> Reply:
        log.failure("storing message {queue_id} failed", failure=failure, queue_id=queue_id)
        return Reply(451, "4.3.0", "Error: could not store the message, try again later")

    def _run(self, fn: Any, *args: Any) -> defer.Deferred:
        """CPU- and DNS-bound checks run in the reactor's general thread pool."""
        reactor = self.context.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


@dataclass(frozen=True)
class Action:
    """What DMARC policy makes of a message: accept, quarantine (into Junk), reject or
    defer, the reply for the last two, and what the event records."""

    kind: str
    reply: Reply | None = None
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    copy: bytes  # as delivered here
    message: bytes  # as forwarded
    structure: tuple[bytes, bytes, bytes]
    action: Action


@dataclass(frozen=True)
class Refusal:
    reply: Reply
    detail: dict


def dmarc_action(verdict: authresults.Verdict, config: MXConfig, roll: float) -> Action:
    """The receiver's side of RFC 7489 6.6: what to do with a message given its verdicts.

    `roll` in [0, 1) samples pct=: a message outside the sample gets the next milder policy
    (6.6.4), reject becoming quarantine. A DMARC failure is not enforced for a From domain
    in `dmarc_exempt`, nor when the newest seal of a passing ARC chain is one of
    `arc_trusted_sealers` (RFC 7489 7.2: the local policy may trust such a forwarder).
    A temporary DNS failure (SPF or DKIM temperror) where p=reject could apply, or where the
    DMARC record itself could not be fetched, is deferred (451 4.4.3) as Postfix with
    OpenDMARC does: accepting could let a forgery through, rejecting could refuse good mail.
    """
    dmarc = verdict.dmarc
    if config.dmarc_enforce and dmarc.ambiguous:
        # RFC 7489 6.6.1: with several authors there is no domain to evaluate, and a reader
        # may be shown any of them: the way round every DMARC policy.
        return Action("reject", Reply(550, "5.7.1", "Message rejected: DMARC needs exactly "
                                      "one From address (RFC 7489 6.6.1)"),
                      {"dmarc": dmarc.result, "reason": "dmarc ambiguous from"})
    if not config.dmarc_enforce or dmarc.result not in ("fail", "temperror"):
        return Action("accept")
    domain = dmarc.from_domain or ""
    detail = {"dmarc": dmarc.result, "from_domain": domain, "dmarc_policy": dmarc.policy}
    if _listed(domain, config.dmarc_exempt_domains):
        return Action("accept", detail={**detail, "override": "local policy"})
    if verdict.arc.result == "pass" and _listed(verdict.arc.sealer or "",
                                                config.arc_trusted_domains):
        return Action("accept", detail={**detail, "override": "trusted forwarder",
                                        "arc_sealer": verdict.arc.sealer})
    if verdict.temperror and (dmarc.result == "temperror" or dmarc.policy == "reject"):
        return Action("defer", Reply(451, "4.4.3", "Temporary DNS failure checking the "
                                     "sender's authentication, try again later"),
                      {**detail, "reason": "dmarc temperror"})
    if dmarc.result != "fail" or dmarc.policy not in ("reject", "quarantine"):
        return Action("accept")
    kind = dmarc.policy
    if roll * 100 >= dmarc.pct:
        kind = "quarantine" if kind == "reject" else "accept"
        detail["sampled_out"] = True  # pct= left this one to the milder policy
    if kind == "reject":
        return Action("reject", Reply(550, "5.7.1", f"Message rejected: it fails the DMARC "
                                      f"policy of {domain} (p=reject)"),
                      {**detail, "reason": "dmarc"})
    return Action(kind, detail=detail if kind == "quarantine" else {})


def _listed(domain: str, domains: frozenset[str]) -> bool:
    """`domain` is one of `domains` or a subdomain of one."""
    labels = domain.lower().rstrip(".").split(".")
    return any(".".join(labels[i:]) in domains for i in range(len(labels)))


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
