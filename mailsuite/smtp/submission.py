"""Message submission (RFC 6409, RFC 8314): authenticated clients send through us.

Policy lives here: AUTH only over TLS, which senders an account may use, what happens to
local and remote recipients. The protocol machinery is server.ESMTPServer.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailsuite import metrics, sending
from mailsuite.addresses import Address
from mailsuite.auth import Authenticator, SASLError, decode_sasl_plain
from mailsuite.config import Config
from mailsuite.mime import count_fields
from mailsuite.smtp.server import (
    ESMTPServer,
    ESMTPServerFactory,
    Reply,
    Transaction,
    received_header,
)
from mailsuite.store import (
    AccountRow,
    AsyncStore,
    Resolution,
    SenderIdentities,
    Submission,
    new_queue_id,
)
from mailsuite.store.batcher import Batcher

log = Logger(namespace="mailsuite.submission")


@dataclass
class SubmissionContext:
    config: Config
    store: AsyncStore
    submissions: Batcher[Submission]
    authenticator: Authenticator
    reactor: Any
    queued: Any  # called after a commit that queued mail (wakes the delivery workers)
    #: recent recipient routes, address -> ((resolution, suppression), expiry); an app
    #: sending to the same addresses all day costs no lookup per RCPT
    routes: dict[str, tuple[tuple[Resolution, str | None], float]] = field(
        default_factory=dict)

    #: a domain's signing keys, kept a minute: a message costs no key lookup
    signing_keys: sending.SigningKeys = field(init=False)

    ROUTE_TTL = 5.0

    def __post_init__(self) -> None:
        self.signing_keys = sending.SigningKeys(self.store.store)

    def route(self, address: str) -> tuple[Resolution, str | None] | defer.Deferred:
        hit = self.routes.get(address)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        d = self.store.route_recipient(address)
        d.addCallback(self._remember, address)
        return d

    def forget_route(self, address: str) -> None:
        """The address's route changed here (it was just suppressed)."""
        self.routes.pop(address.lower(), None)

    def _remember(self, route: tuple[Resolution, str | None],
                  address: str) -> tuple[Resolution, str | None]:
        if route[0].kind != "unknown":  # a user added a moment ago is never refused
            if len(self.routes) > 10000:
                self.routes.clear()
            self.routes[address] = (route, time.monotonic() + self.ROUTE_TTL)
        return route


class SubmissionFactory(ESMTPServerFactory):
    def __init__(self, context: SubmissionContext, tls_options: Any | None,
                 implicit_tls: bool = False) -> None:
        super().__init__(context.config.server.hostname, context.config.smtp, tls_options,
                         clock=context.reactor, implicit_tls=implicit_tls)
        self.context = context

    def buildProtocol(self, addr: Any) -> SubmissionServer:
        proto = SubmissionServer(self.context)
        proto.factory = self
        return proto


class SubmissionServer(ESMTPServer):
    service_name = "ESMTP submission"

    def __init__(self, context: SubmissionContext) -> None:
        super().__init__()
        self.context = context
        self.account: AccountRow | None = None
        self.identities: SenderIdentities | None = None
        self._sasl: tuple[str, str | None] | None = None  # (mechanism, username so far)

    @property
    def _may_authenticate(self) -> bool:
        return self.tls or self.context.config.auth.allow_plaintext

    def extensions(self) -> list[str]:
        exts = super().extensions()
        if self._may_authenticate and self.account is None:
            exts.append("AUTH PLAIN LOGIN")
        return exts

    def smtp_STARTTLS(self, argument: str) -> Reply | None:
        reply = super().smtp_STARTTLS(argument)
        if self.tls:
            self.account = self.identities = None  # RFC 3207 4.2: start again from nothing
        return reply

    # --- AUTH (RFC 4954) -----------------------------------------------------------------
    def line_received(self, line: bytes) -> defer.Deferred | None:
        if self._sasl is None:
            return super().line_received(line)
        text = line.decode("ascii", "replace").strip()
        mechanism, username = self._sasl
        self._sasl = None
        if text == "*":
            self._send(Reply(501, "5.0.0", "Authentication cancelled"))
            return None
        return self._respond(self._sasl_step(mechanism, username, text))

    def _respond(self, result: Reply | defer.Deferred | None) -> defer.Deferred | None:
        if isinstance(result, defer.Deferred):
            return self._answer_later(result)
        if result is not None:
            self._send(result)
        return None

    def smtp_AUTH(self, argument: str) -> Reply | defer.Deferred | None:
        if self.helo is None or not self.esmtp:
            return self._junk_and(Reply(503, "5.5.1", "Error: send EHLO first"))
        if self.account is not None:
            return self._junk_and(Reply(503, "5.5.1", "Error: already authenticated"))
        if self.transaction is not None:
            return self._junk_and(Reply(503, "5.5.1", "Error: AUTH not allowed during a mail "
                                                       "transaction"))
        if not self._may_authenticate:
            return Reply(538, "5.7.11", "Encryption required for requested authentication "
                                        "mechanism; use STARTTLS first")
        mechanism, _, initial = argument.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism not in ("PLAIN", "LOGIN"):
            return self._junk_and(Reply(504, "5.5.4", "Unrecognized authentication type"))
        if not initial:
            self._sasl = (mechanism, None)
            return Reply(334, "", "" if mechanism == "PLAIN" else "VXNlcm5hbWU6")  # Username:
        return self._sasl_step(mechanism, None, initial)

    def _sasl_step(self, mechanism: str, username: str | None,
                   response: str) -> Reply | defer.Deferred:
        if mechanism == "PLAIN":
            try:
                user, password = decode_sasl_plain("" if response == "=" else response)
            except SASLError as exc:
                return Reply(501, "5.5.2", f"Cannot decode response: {exc}")
            return self._login(user, password)
        try:
            value = base64.b64decode(response, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return Reply(501, "5.5.2", "Cannot decode response")
        if username is None:
            self._sasl = ("LOGIN", value)
            return Reply(334, "", "UGFzc3dvcmQ6")  # Password:
        return self._login(username, value)

    def _login(self, username: str, password: str) -> defer.Deferred:
        d = self.context.authenticator.login(username, password, self.peer_ip,
                                             scope="messages:send")
        d.addCallback(self._logged_in, username)
        return d

    def _logged_in(self, account: AccountRow | None, username: str) -> Any:
        if account is None:
            log.info("submission login failed peer={peer} user={user}", peer=self.peer_ip,
                     user=username)
            if self.context.authenticator.should_disconnect(self.peer_ip):
                self._send(Reply(421, "4.7.0", f"{self.hostname} Too many failed logins"))
                self.close()
                return None
            return Reply(535, "5.7.8", "Authentication credentials invalid")
        d = self.context.store.sender_identities(account.id)

        def done(identities: SenderIdentities) -> Reply:
            self.account, self.identities = account, identities
            return Reply(235, "2.7.0", "Authentication successful")

        return d.addCallback(done)

    # --- MAIL FROM, RCPT TO --------------------------------------------------------------
    def check_sender(self, txn: Transaction) -> Reply:
        if self.account is None or self.identities is None:
            return Reply(530, "5.7.0", "Authentication required")
        if txn.sender is None:
            return Reply(553, "5.7.1", "The null sender is for bounces, not for submission")
        if not self.identities.allows(txn.sender.normal):
            return Reply(553, "5.7.1", f"<{txn.sender}>: Sender address not owned by user "
                                       f"{self.account.address}")
        return Reply(250, "2.1.0", "Ok")

    def check_recipient(self, txn: Transaction, address: Address) -> Any:
        if self.account is None:
            return Reply(530, "5.7.0", "Authentication required"), None
        if address.is_ip_literal:
            return Reply(550, "5.1.2", f"<{address}>: address literals are not accepted"), None
        return self._chain(self.context.route(address.normal), self._routed, address)

    def _routed(self, route: tuple[Resolution, str | None],
                address: Address) -> tuple[Reply, Any]:
        resolution, suppressed = route
        if resolution.kind == "unknown":
            return Reply(550, "5.1.1", f"<{address}>: Recipient address rejected: "
                                       "user unknown"), None
        if suppressed is not None:
            return Reply(550, "5.7.1", f"<{address}>: Recipient address is suppressed after a "
                                       f"hard bounce ({suppressed}); the postmaster can clear "
                                       "it"), None
        return Reply(250, "2.1.5", "Ok"), resolution

    # --- DATA ----------------------------------------------------------------------------
    def accept_message(self, txn: Transaction, raw: bytes) -> Any:
        limit = self.context.config.smtp.max_received_headers
        if count_fields(raw, "Received") >= limit:
            return Reply(554, "5.4.6", f"Mail loop detected: {limit} Received headers")
        queue_id = new_queue_id()
        received = received_header(txn, self.esmtp, self.tls, self.helo or "", self.peer_ip,
                                   self.hostname, queue_id, authenticated=True)
        reactor = self.context.reactor
        d = threads.deferToThreadPool(reactor, reactor.getThreadPool(), self._prepare, txn, raw,
                                      received, queue_id)
        d.addCallback(self._commit, queue_id)
        return d

    def _prepare(self, txn: Transaction, raw: bytes, received: bytes,
                 queue_id: str) -> Submission | Reply:
        """In a thread: the shared pipeline (sender policy, completion, signing, routing)."""
        assert self.identities is not None and self.account is not None
        prepared = sending.prepare(sending.Outgoing(
            account=self.account, identities=self.identities, raw=raw,
            envelope_from=txn.sender_text, recipients=txn.recipients, queue_id=queue_id,
            hostname=self.hostname, via="submission", smtputf8=txn.smtputf8),
            self.context.signing_keys, received)
        if isinstance(prepared, sending.Refused):
            return Reply(prepared.code, prepared.status, prepared.text)
        return prepared

    def _commit(self, prepared: Submission | Reply, queue_id: str) -> Any:
        if isinstance(prepared, Reply):
            return prepared
        d = self.context.submissions.submit(prepared)

        def committed(_: Any) -> Reply:
            metrics.MESSAGES.labels("sent").inc()
            if prepared.outbound is not None:
                self.context.queued()
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

        def failed(failure: Any) -> Reply:
            log.failure("committing submission {queue_id} failed", failure=failure,
                        queue_id=queue_id)
            return Reply(451, "4.3.0", "Error: could not queue the message, try again later")

        return d.addCallbacks(committed, failed)
