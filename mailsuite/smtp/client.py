"""An ESMTP client for outbound delivery: one session, several transactions, pipelined.

Our own rather than twisted.mail.smtp.ESMTPSender, which neither pipelines nor offers
BODY=8BITMIME or SMTPUTF8, and reports one outcome per message where we need one per
recipient. Replies are matched to commands strictly in order (RFC 2920).
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, endpoints, error, ssl
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
MAX_REPLY_LINES = 100


@dataclass(frozen=True)
class SMTPReply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply as one line, e.g. "550 5.1.1 <a@b>: no such user"; control characters
        and anything past 500 characters of a remote's text never reach logs or DSNs."""
        joined = " ".join(line.strip() for line in self.lines).strip()
        clean = "".join(c if c.isprintable() else "?" for c in joined)
        return f"{self.code} {clean[:500]}"

    @property
    def status(self) -> str:
        """The RFC 3463 enhanced status code, or one derived from the basic code."""
        match = _STATUS.match(self.lines[0] if self.lines else "")
        if match and match.group(1) == str(self.code)[0]:
            return match.group(0)
        return f"{str(self.code)[0]}.0.0"

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400


class SessionError(Exception):
    """The session could not carry mail; `permanent` says whether trying again can help."""

    def __init__(self, text: str, status: str, permanent: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.permanent = permanent


class TLSFailed(SessionError):
    """STARTTLS was agreed but the handshake (or the certificate) failed."""


class SMTPClientProtocol(LineOnlyReceiver):
    """Line-level client: read_reply() gives the next whole reply, in order."""

    MAX_LENGTH = 4096  # RFC 5321 allows 512 octets per reply line; be lenient, not unbounded

    def __init__(self, clock: Any, timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._lines: list[str] = []
        self._replies: deque[SMTPReply] = deque()
        self._waiting: deque[defer.Deferred] = deque()
        self._lost: Failure | None = None
        self._timer: Any = None

    def lineReceived(self, line: bytes) -> None:
        if self._lost is not None:
            return  # aborted: what follows in the same segment must not answer anything
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self._fail(SessionError(f"malformed reply from server: {text[:80]!r}", "4.5.0"))
            return
        self._lines.append(text[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            self._fail(SessionError("reply too long", "4.5.0"))
            return
        if text[3:4] == "-":
            return
        reply = SMTPReply(int(text[:3]), tuple(self._lines))
        self._lines = []
        if self._waiting:
            self._waiting.popleft().callback(reply)
            self._arm()
        elif len(self._replies) < MAX_REPLY_LINES:
            self._replies.append(reply)
        else:
            self._fail(SessionError("server sends replies nobody asked for", "4.5.0"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(SessionError("reply line too long", "4.5.0"))

    def read_reply(self, timeout: float | None = None) -> defer.Deferred:
        if timeout is not None:
            self.timeout = timeout
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._lost is not None:
            return defer.fail(self._lost)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        self._arm()
        return d

    def send(self, *lines: str) -> None:
        """Write command lines in one segment (several at once when pipelining)."""
        self.transport.write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))

    def command(self, line: str) -> defer.Deferred:
        self.send(line)
        return self.read_reply()

    def _arm(self) -> None:
        """One timer while anything is awaited: RFC 5321 4.5.3.2 per-command timeouts."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._waiting:
            self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(SessionError(f"timeout after {self.timeout:g}s waiting for the server",
                                "4.4.2"))

    def _fail(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = Failure(exc)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._lost is None:
            text = reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)
            self._lost = Failure(SessionError(f"connection lost: {text}", "4.4.2"))
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(self._lost)


@dataclass
class Session:
    protocol: SMTPClientProtocol
    peer: str  # the host name (or address) we talk to, for logs and DSNs
    extensions: dict[str, str] = field(default_factory=dict)
    tls: bool = False

    def has(self, name: str) -> bool:
        return name in self.extensions


@dataclass(frozen=True)
class TLSPolicy:
    mode: str  # none, opportunistic, required (STARTTLS, verified) or implicit
    hostname: str = ""  # the name a verified certificate must carry
    verify: bool = False
    trust: Any = None  # twisted IOpenSSLTrustRoot, None for the platform's


@dataclass(frozen=True)
class RecipientResult:
    reply: SMTPReply
    stage: str  # mail, rcpt, data or local (our own refusal, nothing sent)


async def open_session(reactor: Any, host: str, port: int, peer: str, helo: str,
                       tls: TLSPolicy, connect_timeout: float, command_timeout: float,
                       own_names: frozenset[str] = frozenset(),
                       auth: tuple[str, str] | None = None) -> Session:
    """Connect, read the greeting, EHLO, STARTTLS and AUTH as the policy says."""
    endpoint: Any = endpoints.HostnameEndpoint(reactor, host.encode("idna"), port,
                                               timeout=connect_timeout)
    if tls.mode == "implicit":
        endpoint = endpoints.wrapClientTLS(_client_tls(tls), endpoint)
    protocol = SMTPClientProtocol(reactor, command_timeout)
    try:
        await endpoints.connectProtocol(endpoint, protocol)
    except defer.CancelledError:
        raise
    except Exception as exc:
        raise SessionError(f"connect to {peer}[{host}]:{port} failed: {exc}", "4.4.1") from exc
    session = Session(protocol, peer, tls=tls.mode == "implicit")
    try:
        greeting = await protocol.read_reply()
        if greeting.code != 220:
            raise SessionError(f"{peer} greeted us with {greeting.text}", greeting.status,
                               permanent=False)
        _check_loop(greeting, own_names, peer)
        await _ehlo(session, helo, own_names)
        if tls.mode in ("opportunistic", "required") and not session.tls:
            if session.has("STARTTLS"):
                reply = await protocol.command("STARTTLS")
                if reply.code == 220:
                    protocol.transport.startTLS(_client_tls(tls))
                    session.tls = True
                    try:
                        await _ehlo(session, helo, own_names)  # RFC 3207 4.2: start afresh
                    except SessionError as exc:
                        if exc.permanent:
                            raise
                        raise TLSFailed(f"TLS with {peer} failed: {exc.text}", "4.7.5") from exc
                elif tls.mode == "required":
                    raise SessionError(f"{peer} refused STARTTLS: {reply.text}", "4.7.5")
            elif tls.mode == "required":
                raise SessionError(f"{peer} offers no STARTTLS, and TLS is required", "4.7.4")
        if auth is not None:
            await _authenticate(session, *auth)
    except BaseException:
        protocol.transport.abortConnection()
        raise
    return session


async def _ehlo(session: Session, helo: str, own_names: frozenset[str]) -> None:
    reply = await session.protocol.command(f"EHLO {helo}")
    if reply.code != 250:
        reply = await session.protocol.command(f"HELO {helo}")
        if reply.code != 250:
            raise SessionError(f"{session.peer} refused HELO: {reply.text}", reply.status)
        session.extensions = {}
        return
    _check_loop(reply, own_names, session.peer)
    session.extensions = {}
    for line in reply.lines[1:]:
        keyword, _, value = line.strip().partition(" ")
        session.extensions[keyword.upper()] = value


def _check_loop(reply: SMTPReply, own_names: frozenset[str], peer: str) -> None:
    """A server that calls itself by our name is us: mail sent there would come back."""
    words = reply.lines[0].split() if reply.lines else []
    if words and words[0].lower().rstrip(".") in own_names:
        raise SessionError(f"mail for {peer} loops back to myself", "5.4.6", permanent=True)


async def _authenticate(session: Session, username: str, password: str) -> None:
    mechanisms = session.extensions.get("AUTH", "").upper().split()
    if not session.tls and session.peer not in ("127.0.0.1", "::1", "localhost"):
        raise SessionError(f"{session.peer}: no TLS, so no AUTH", "4.7.0")
    protocol = session.protocol
    if "PLAIN" in mechanisms:
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
        reply = await protocol.command(f"AUTH PLAIN {token}")
    elif "LOGIN" in mechanisms:
        reply = await protocol.command("AUTH LOGIN")
        for value in (username, password):
            if reply.code != 334:
                break
            reply = await protocol.command(base64.b64encode(value.encode()).decode("ascii"))
    else:
        raise SessionError(f"{session.peer} offers neither AUTH PLAIN nor LOGIN", "4.7.0")
    if reply.code != 235:
        raise SessionError(f"{session.peer} refused our credentials: {reply.text}", "4.7.0")


def _client_tls(tls: TLSPolicy) -> Any:
    if tls.verify:
        return ssl.optionsForClientTLS(tls.hostname, trustRoot=tls.trust)
    # Opportunistic (RFC 7435): encryption without authentication beats plaintext.
    return ssl.CertificateOptions(verify=False)


async def send_mail(session: Session, sender: str, recipients: list[str], data: bytes,
                    smtputf8: bool, eightbit: bool) -> dict[str, RecipientResult]:
    """One transaction; every recipient's outcome, each on its own (RFC 5321 3.3)."""
    refusal = _refusal(session, len(data), smtputf8, eightbit)
    if refusal is not None:
        return {rcpt: RecipientResult(refusal, "local") for rcpt in recipients}
    params = []
    if session.has("SIZE"):
        params.append(f"SIZE={len(data)}")
    if eightbit:
        params.append("BODY=8BITMIME")
    if smtputf8:
        params.append("SMTPUTF8")
    mail = " ".join([f"MAIL FROM:<{sender}>", *params])
    rcpts = [f"RCPT TO:<{rcpt}>" for rcpt in recipients]
    protocol = session.protocol
    results: dict[str, RecipientResult] = {}
    if session.has("PIPELINING"):
        protocol.send(mail, *rcpts, "DATA")
        mail_reply = await protocol.read_reply()
        rcpt_replies = [await protocol.read_reply() for _ in rcpts]
        data_reply = await protocol.read_reply()
    else:
        mail_reply = await protocol.command(mail)
        rcpt_replies, data_reply = [], None
        if mail_reply.code == 250:
            rcpt_replies = [await protocol.command(line) for line in rcpts]
    if mail_reply.code != 250:
        if data_reply is not None and data_reply.code == 354:
            data_reply = await _abort_data(protocol)
        await _reset(protocol)
        return {rcpt: RecipientResult(mail_reply, "mail") for rcpt in recipients}
    accepted = []
    for rcpt, reply in zip(recipients, rcpt_replies, strict=True):
        if reply.code in (250, 251):
            accepted.append(rcpt)
        else:
            results[rcpt] = RecipientResult(reply, "rcpt")
    if data_reply is None and accepted:
        data_reply = await protocol.command("DATA")
    if not accepted:
        if data_reply is not None and data_reply.code == 354:
            await _abort_data(protocol)
        await _reset(protocol)
        return results
    assert data_reply is not None
    if data_reply.code != 354:
        results.update({rcpt: RecipientResult(data_reply, "data") for rcpt in accepted})
        await _reset(protocol)
        return results
    protocol.transport.write(dot_stuff(data) + b".\r\n")
    # The timer starts while the message may still be in our send buffer: allow for a
    # slow link (8 KiB/s) on top of the 10 minutes RFC 5321 4.5.3.2 gives the final reply.
    command_timeout = protocol.timeout
    final = await protocol.read_reply(max(600.0, command_timeout) + len(data) / 8192)
    protocol.timeout = command_timeout
    results.update({rcpt: RecipientResult(final, "data") for rcpt in accepted})
    return results


def _refusal(session: Session, size: int, smtputf8: bool, eightbit: bool) -> SMTPReply | None:
    """What we refuse to send to this server, rather than send it something it can't take."""
    limit = session.extensions.get("SIZE", "")
    if limit.isdigit() and int(limit) and size > int(limit):
        return SMTPReply(552, (f"5.3.4 message of {size} bytes exceeds {session.peer}'s limit "
                               f"of {limit}",))
    if smtputf8 and not session.has("SMTPUTF8"):
        return SMTPReply(553, (f"5.6.7 {session.peer} does not support SMTPUTF8, which this "
                               "message needs",))
    if eightbit and not session.has("8BITMIME"):
        return SMTPReply(554, (f"5.6.3 {session.peer} does not support 8BITMIME, which this "
                               "message needs",))
    return None


async def _abort_data(protocol: SMTPClientProtocol) -> SMTPReply:
    """The server took DATA though nothing was accepted: send an empty message's end."""
    protocol.transport.write(b".\r\n")
    return await protocol.read_reply()


async def _reset(protocol: SMTPClientProtocol) -> None:
    reply = await protocol.command("RSET")
    if reply.code != 250:
        raise SessionError(f"RSET refused: {reply.text}", reply.status)


async def quit_session(session: Session) -> None:
    """Say goodbye politely; a server that has gone already is no error."""
    with contextlib.suppress(SessionError):
        await session.protocol.command("QUIT")
    session.protocol.transport.loseConnection()


def dot_stuff(data: bytes) -> bytes:
    """CRLF line ends and doubled leading dots (RFC 5321 4.5.2), ending in CRLF."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed
