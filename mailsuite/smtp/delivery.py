"""Outbound delivery: claim due recipients, send them to their MX (or the smarthost),
and settle each recipient: delivered, deferred with backoff, bounced or expired.

Recipients of one domain share a connection and a transaction; a connection carries
further messages for its domain before it quits. Timing comes from `clock`, so tests can
move time; network I/O goes through `reactor`.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dns.resolver
from twisted.application import service
from twisted.internet import defer, ssl, task, threads
from twisted.logger import Logger

from mailsuite.config import Config
from mailsuite.smtp import dsn
from mailsuite.smtp.client import (
    RecipientResult,
    Session,
    SessionError,
    SMTPReply,
    TLSFailed,
    TLSPolicy,
    open_session,
    quit_session,
    send_mail,
)
from mailsuite.smtp.routing import MXHost, RouteError, resolve_route
from mailsuite.store import AsyncStore, Job, Outcome, QueuedRecipient, Settlement
from mailsuite.store.batcher import Batcher

log = Logger(namespace="mailsuite.delivery")

RELAY = "[relay]"  # the destination key when everything goes through the smarthost


@dataclass
class Work:
    """Some claimed recipients of one message, for one destination."""

    job: Job
    recipients: list[QueuedRecipient]


@dataclass
class Destination:
    key: str  # a domain, or RELAY
    pending: deque[Work] = field(default_factory=deque)
    active: int = 0


class QueueRunner(service.Service):
    def __init__(self, config: Config, store: AsyncStore, resolver: dns.resolver.Resolver,
                 reactor: Any, holder: str, clock: Any = None) -> None:
        self.config = config
        self.delivery = config.delivery
        self.store = store
        self.resolver = resolver
        self.reactor = reactor
        self.clock = clock or reactor
        self.holder = holder
        self.helo = config.delivery.helo_name or config.server.hostname
        self.own_names = frozenset({config.server.hostname.lower(), self.helo.lower()})
        self.destinations: dict[str, Destination] = {}
        self.connections = 0
        self._claiming = False
        self._call: Any = None
        self._stopping = False
        self._idle: list[defer.Deferred] = []
        self._trust = _load_trust(config.delivery.ca_file)
        self._wanted = False  # woken while a claim was running: look again right after it
        self._opening: set[defer.Deferred] = set()  # connections not yet carrying mail
        self._held: set[int] = set()  # ids of recipients claimed and not yet settled
        self._renewer = task.LoopingCall(self._renew)
        self._renewer.clock = self.clock
        #: told of each address that hard-bounced (submission forgets what it knew of it)
        self.on_suppressed: Any = None
        # Outcomes from every connection share transactions, as deliveries do in the MX.
        self._settlements: Batcher[Settlement] = Batcher(
            store.store.queue_settle_many, store.pool, reactor, config.database.batch_max)

    # --- scheduling ----------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._schedule(0)
        self._renewer.start(self.delivery.claim_timeout / 3, now=False)

    def wake(self) -> None:
        """New mail was queued by this process: look now rather than at the next poll."""
        if self._claiming:
            self._wanted = True
        elif self._call is not None and self._call.active():
            self._call.reset(0)

    def _schedule(self, delay: float) -> None:
        if self._stopping or self._claiming:
            return
        if self._call is not None and self._call.active():
            if delay < self._call.getTime() - self.clock.seconds():
                self._call.reset(delay)
            return
        self._call = self.clock.callLater(delay, self._tick)

    @property
    def busy(self) -> bool:
        """Claiming or sending right now."""
        return self._claiming or self.connections > 0

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def _tick(self) -> None:
        self._call = None
        waiting = sum(len(dest.pending) for dest in self.destinations.values())
        room = self.delivery.claim_batch - waiting
        if room <= 0 or self._stopping:
            self._schedule(self.delivery.poll_interval)
            return
        self._claiming = True
        d = self.store.queue_claim(self.holder, self.now(), room, self.delivery.claim_timeout)
        d.addCallback(self._claimed)
        d.addErrback(lambda f: log.failure("claiming queued mail failed", failure=f) or 0)
        d.addBoth(self._claim_done)

    def _claimed(self, jobs: list[Job]) -> int:
        count = 0
        for job in jobs:
            count += len(job.recipients)
            # A recipient this process still holds can come back if its claim lapsed
            # (the renewal failed): it is already being sent, so it is not sent again.
            fresh = [rcpt for rcpt in job.recipients if rcpt.id not in self._held]
            self._held.update(rcpt.id for rcpt in fresh)
            if self.config.relay.host:
                groups = {RELAY: fresh} if fresh else {}
            else:
                groups = {}
                for rcpt in fresh:
                    groups.setdefault(rcpt.domain, []).append(rcpt)
            for key, recipients in groups.items():
                dest = self.destinations.setdefault(key, Destination(key))
                dest.pending.append(Work(job, recipients))
        self._start_connections()
        return count

    def _claim_done(self, count: Any) -> None:
        self._claiming = False
        busy = isinstance(count, int) and count >= max(1, self.delivery.claim_batch // 2)
        # A full claim means more is probably due: look again at once.
        self._schedule(0 if busy or self._wanted else self.delivery.poll_interval)
        self._wanted = False
        self._check_idle()

    def _start_connections(self) -> None:
        for dest in list(self.destinations.values()):
            while (dest.pending and dest.active < len(dest.pending)
                   and dest.active < self.delivery.max_connections_per_domain
                   and self.connections < self.delivery.max_connections and not self._stopping):
                dest.active += 1
                self.connections += 1
                defer.ensureDeferred(self._connection(dest)).addErrback(
                    lambda f: log.failure("delivery connection failed", failure=f))

    # --- one connection ------------------------------------------------------------------
    async def _connection(self, dest: Destination) -> None:
        session: Session | None = None
        sent = 0
        try:
            while dest.pending and not self._stopping:
                work = dest.pending.popleft()
                try:
                    if session is None:
                        opening = defer.ensureDeferred(self._open(dest))
                        self._opening.add(opening)
                        try:
                            session = await opening
                        except defer.CancelledError:
                            break  # stopping: nothing was sent; the claim is given back
                        except (RouteError, SessionError) as exc:
                            await self._fail_destination(dest, work, exc)
                            break
                        finally:
                            self._opening.discard(opening)
                    session = await self._deliver(session, work)
                except Exception:
                    # Not settled: the claim lapses and the recipients are tried again.
                    log.failure("delivering {queue_id} failed", queue_id=work.job.queue_id)
                    if session is not None:
                        session.protocol.transport.abortConnection()
                    session = None
                finally:
                    self._release(work)
                sent += 1
                if session is not None and sent >= self.delivery.max_messages_per_connection:
                    await quit_session(session)
                    session, sent = None, 0
        finally:
            if session is not None:
                await quit_session(session)
            dest.active -= 1
            self.connections -= 1
            if not dest.pending and not dest.active:
                self.destinations.pop(dest.key, None)
            self._start_connections()
            self._check_idle()

    async def _deliver(self, session: Session, work: Work) -> Session | None:
        """Send one message; the session if it can carry another."""
        data = work.job.data
        if data is None:
            data = await self.store.queue_data(work.job.outbound_id)
        if data is None:
            return session  # deleted by an operator meanwhile
        addresses = [rcpt.recipient for rcpt in work.recipients]
        try:
            results = await send_mail(session, work.job.sender, addresses, data,
                                      work.job.smtputf8, work.job.eightbit)
        except SessionError as exc:
            await self._settle(work, {a: _temporary(exc) for a in addresses}, session.peer)
            session.protocol.transport.abortConnection()
            return None
        await self._settle(work, results, session.peer)
        return session

    async def _open(self, dest: Destination) -> Session:
        relay = self.config.relay
        timeouts = (self.delivery.connect_timeout, self.delivery.command_timeout)
        if dest.key == RELAY:
            policy = TLSPolicy(
                {"none": "none", "starttls": "required", "implicit": "implicit"}[relay.tls],
                hostname=relay.host, verify=relay.verify, trust=self._trust)
            auth = (relay.username, relay.password) if relay.username else None
            return await open_session(self.reactor, relay.host, relay.port, relay.host,
                                      self.helo, policy, *timeouts, self.own_names, auth)
        hosts: list[MXHost] = await threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), resolve_route, self.resolver, dest.key,
            self.own_names)
        required = dest.key in self.delivery.tls_required_domains
        last: SessionError | None = None
        for host in hosts:
            for address in host.addresses:
                policy = TLSPolicy("required" if required else "opportunistic",
                                   hostname=host.name, verify=required, trust=self._trust)
                try:
                    return await open_session(self.reactor, address, self.delivery.port,
                                              host.name, self.helo, policy, *timeouts,
                                              self.own_names)
                except TLSFailed as exc:
                    if required:
                        last = exc
                        continue
                    # Opportunistic TLS that fails falls back to plaintext (RFC 7435 6).
                    log.info("TLS with {host} failed, trying without: {error}", host=host.name,
                             error=exc.text)
                    try:
                        return await open_session(
                            self.reactor, address, self.delivery.port, host.name, self.helo,
                            TLSPolicy("none"), *timeouts, self.own_names)
                    except SessionError as plain:
                        last = plain
                except SessionError as exc:
                    if exc.permanent:
                        raise
                    last = exc
        raise last or SessionError(f"no usable MX host for {dest.key}", "4.4.4")

    async def _fail_destination(self, dest: Destination, work: Work,
                                exc: RouteError | SessionError) -> None:
        """Nothing for this destination can go now: settle what waits for it the same way."""
        failed = [work]
        while dest.pending:
            failed.append(dest.pending.popleft())
        code = 550 if exc.permanent else 451
        reply = SMTPReply(code, (f"{exc.status} {exc.text}",))
        try:
            for item in failed:
                await self._settle(item, {r.recipient: RecipientResult(reply, "connect")
                                          for r in item.recipients}, "")
        finally:
            for item in failed:
                self._release(item)

    # --- outcomes ------------------------------------------------------------------------
    async def _settle(self, work: Work, results: dict[str, RecipientResult],
                      remote: str) -> None:
        try:
            await self._record(work, results, remote)
        finally:
            self._release(work)

    async def _record(self, work: Work, results: dict[str, RecipientResult],
                      remote: str) -> None:
        now = self.now()
        job = work.job
        expires = job.created_at + timedelta(seconds=self.delivery.expire_seconds)
        outcomes = []
        for rcpt in work.recipients:
            result = results[rcpt.recipient]
            reply, text = result.reply, result.reply.text
            if 200 <= reply.code < 300:
                outcomes.append(Outcome(rcpt, "delivered", text, remote))
            elif reply.code >= 500:
                # Only "no such address" answers (5.1.x) at RCPT suppress: a 554 5.7.1 for
                # our IP on a blocklist says nothing about the address.
                outcomes.append(Outcome(rcpt, "bounced", text, remote, suppress=(
                    result.stage == "rcpt" and reply.status.startswith("5.1."))))
            elif now >= expires:
                outcomes.append(Outcome(rcpt, "expired", text, remote))
            else:
                outcomes.append(Outcome(rcpt, "deferred", text, remote,
                                        next_attempt_at=min(expires,
                                                            now + self._backoff(rcpt.attempts))))
        failed = [out for out in outcomes if out.state in ("bounced", "expired")]
        bounce = None
        if failed and job.return_to:
            try:
                bounce = await threads.deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), self._bounce, job, failed, now)
            except Exception:
                log.failure("building the DSN for {queue_id} failed", queue_id=job.queue_id)
                # Tried again later, notice and all; the other outcomes stand.
                outcomes = [replace(out, state="deferred", suppress=False,
                                    next_attempt_at=now + self._backoff(out.recipient.attempts))
                            if out in failed else out for out in outcomes]
        try:
            await self._settlements.submit(
                Settlement(job, tuple(outcomes), now, bounce, holder=self.holder))
        except Exception:
            # The claim runs out and the recipients are tried again: a duplicate at worst.
            log.failure("recording delivery results for {queue_id} failed",
                        queue_id=job.queue_id)
            return
        for out in outcomes:
            if out.suppress and self.on_suppressed is not None:
                self.on_suppressed(out.recipient.recipient)
            log.info("delivery {queue_id} to=<{rcpt}> relay={remote} status={state} {reply}",
                     queue_id=job.queue_id, rcpt=out.recipient.recipient, remote=remote or "-",
                     state=out.state, reply=out.reply)

    def _release(self, work: Work) -> None:
        self._held.difference_update(rcpt.id for rcpt in work.recipients)

    def _renew(self) -> defer.Deferred | None:
        """Extend the claims on everything this process holds, so a slow transaction (or a
        long wait for a connection) never lets another worker take its recipients."""
        if not self._held:
            return None
        until = self.now() + timedelta(seconds=self.delivery.claim_timeout)
        d = self.store.queue_renew(self.holder, sorted(self._held), until)
        d.addErrback(lambda f: log.failure("renewing queue claims failed", failure=f))
        return d

    def _backoff(self, attempts: int) -> timedelta:
        delays = self.delivery.retry_delays
        return timedelta(seconds=delays[min(attempts, len(delays) - 1)])

    def _bounce(self, job: Job, failed: list[Outcome], now: datetime) -> bytes | None:
        """In a thread: the DSN for `failed`, or None when the message itself is one."""
        original = self.store.store.queue_data(job.outbound_id) or b""
        if job.kind == "bounce" or dsn.is_auto_reply(original):
            return None
        recipients = [dsn.FailedRecipient(
            recipient=out.recipient.recipient, status=_status(out.reply),
            diagnostic=out.reply, remote_mta=out.remote or None, last_attempt=now)
            for out in failed]
        return dsn.build_bounce(
            reporting_mta=self.config.server.hostname, original_sender=job.return_to,
            original=original, recipients=recipients, arrival_date=job.created_at,
            queue_id=job.queue_id, expired=all(out.state == "expired" for out in failed),
            now=now)

    # --- stopping ------------------------------------------------------------------------
    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.drain()

    def drain(self, timeout: float = 20.0) -> defer.Deferred:
        """Stop taking work; fire once every connection has settled what it was sending."""
        self._stopping = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._renewer.running:
            self._renewer.stop()
        for dest in self.destinations.values():
            for work in dest.pending:
                self._release(work)  # still claimed: given back by the store at stop
            dest.pending.clear()
        for opening in list(self._opening):
            opening.cancel()  # waiting for a connection or a greeting: nothing to lose
        d: defer.Deferred = defer.Deferred()
        self._idle.append(d)
        self._check_idle()
        if not d.called:
            timer = self.reactor.callLater(timeout, self._give_up, d)
            d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return d

    def _give_up(self, d: defer.Deferred) -> None:
        log.warn("delivery still busy at stop; unsettled recipients will be retried")
        with contextlib.suppress(ValueError):
            self._idle.remove(d)
        d.callback(None)

    def _check_idle(self) -> None:
        if self._stopping and self.connections == 0 and not self._claiming:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)


def _temporary(exc: SessionError) -> RecipientResult:
    code = 550 if exc.permanent else 451
    return RecipientResult(SMTPReply(code, (f"{exc.status} {exc.text}",)), "connect")


def _status(reply_text: str) -> str:
    """The enhanced status in "550 5.1.1 ..." when its class agrees with the code."""
    parts = reply_text.split()
    klass = reply_text[:1] if reply_text[:1] in "245" else "5"
    if len(parts) > 1 and parts[1][:1] == klass and parts[1].count(".") == 2:
        return parts[1]
    return f"{klass}.0.0"


def _load_trust(path: str) -> Any:
    """The CA certificates in `path` as a Twisted trust root; None for the platform's."""
    if not path:
        return None
    text = Path(path).read_text(encoding="ascii")
    marker = "-----END CERTIFICATE-----"
    certs = [ssl.Certificate.loadPEM(part + marker) for part in text.split(marker)
             if "BEGIN CERTIFICATE" in part]
    return ssl.trustRootFromCertificates(certs)
