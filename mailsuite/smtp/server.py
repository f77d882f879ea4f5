"""The ESMTP server protocol shared by the MX and submission listeners.

Written on twisted.internet.protocol rather than twisted.mail.smtp.ESMTP because the latter
runs pipelined commands before earlier ones have answered, keeps plaintext pipelined after
STARTTLS, accepts bare LF line ends inside DATA and has no per-IP or junk-command limits.
Here one command is answered before the next is read, and the listener's policy (who may
send, who may receive, what happens to a message) is left to a subclass's hooks.
"""

from __future__ import annotations

import email.utils
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger

from mailsuite.addresses import Address, AddressError, parse_path
from mailsuite.config import SMTPConfig
from mailsuite.lineproto import SerialLineProtocol
from mailsuite.mime import HeaderChecker, HeaderLimits
from mailsuite.netlimits import ConnectionCounter

log = Logger(namespace="mailsuite.smtp")


@dataclass(frozen=True)
class Reply:
    code: int
    status: str  # RFC 3463 enhanced status code, e.g. "2.1.0"
    text: str

    def encode(self) -> bytes:
        lines = self.text.split("\n")
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            status = f"{self.status} " if self.status else ""
            out.append(f"{self.code}{sep}{status}{line}\r\n")
        return "".join(out).encode("utf-8")

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


@dataclass
class Transaction:
    """One MAIL ... DATA exchange."""

    sender: Address | None = None  # None for MAIL FROM:<>
    smtputf8: bool = False
    body: str = "7BIT"
    declared_size: int | None = None
    recipients: list[tuple[Address, Any]] = field(default_factory=list)  # (address, hook data)
    started: float = field(default_factory=time.monotonic)

    @property
    def sender_text(self) -> str:
        return "" if self.sender is None else str(self.sender)


@dataclass
class SessionLog:
    transactions: list[str] = field(default_factory=list)
    rejected: int = 0


class ESMTPServerFactory(protocol.ServerFactory):
    """Holds what all sessions of one listener share: config, TLS options, per-IP counts."""

    def __init__(self, hostname: str, limits: SMTPConfig, tls_options: Any | None,
                 clock: Any, implicit_tls: bool = False) -> None:
        self.hostname = hostname
        self.clock = clock
        self.limits = limits
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.connections = ConnectionCounter(limits.max_connections_per_ip)


class ESMTPServer(SerialLineProtocol):
    """The protocol machinery; subclasses implement the check_* and accept_message hooks."""

    factory: ESMTPServerFactory
    service_name = "ESMTP"

    def __init__(self) -> None:
        super().__init__()
        self._data: bytearray | None = None  # DATA in progress; starts with a virtual CRLF
        self._data_scan = 0
        #: why the message in DATA will be refused; once set, what arrives is not kept
        self._data_refusal: Reply | None = None
        self._data_received = 0
        self._data_started = 0.0
        self._headers: HeaderChecker | None = None
        self._greeted = False
        self._junk = 0
        self.helo: str | None = None
        self.esmtp = False
        self.tls = False
        self.peer_ip = ""
        self.transaction: Transaction | None = None
        # RFC 2920: a client pipelines RCPTs and DATA behind a MAIL it cannot know will be
        # refused; their 503s are not its fault (up to a transaction's worth of them).
        self._excused = 0
        self.session_log = SessionLog()
        self._started = time.monotonic()
        self._greeting_call: Any = None
        self._counted = False

    # --- connection ----------------------------------------------------------------------
    @property
    def limits(self) -> SMTPConfig:
        return self.factory.limits

    @property
    def hostname(self) -> str:
        return self.factory.hostname

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", str(peer))
        self.tls = self.factory.implicit_tls
        self.max_line = self.limits.max_command_line
        if not self.factory.connections.acquire(self.peer_ip):
            self._send(Reply(421, "4.7.0", f"{self.hostname} Too many connections from your "
                                             "address, try again later"))
            self.close()
            return
        self._counted = True
        self.setTimeout(self.limits.idle_timeout)
        self.command_deadline = self.limits.command_timeout
        self.set_deadline("session", self.limits.max_session_time)
        if self.limits.greeting_delay > 0:
            # A client that talks before our greeting is not a conforming SMTP client.
            self._greeting_call = self.factory.clock.callLater(
                self.limits.greeting_delay, self._greet)
        else:
            self._greet()

    def _greet(self) -> None:
        self._greeting_call = None
        if self._client_spoke_first():
            self.dataReceived(b"")
            return
        self._greeted = True
        self._send(Reply(220, "", f"{self.hostname} {self.service_name} mailsuite ready"))

    def _client_spoke_first(self) -> bool:
        """Whether input is already waiting in the socket, unread because we were busy.

        Without this look, a loaded server would read an early talker's input only after
        its greeting timer had fired, and take it for a conforming client.
        """
        if self.limits.greeting_delay <= 0 or self.factory.implicit_tls:
            # Under implicit TLS the handle is a pyOpenSSL Connection, not a socket; input
            # before the greeting is still refused by dataReceived.
            return False
        try:
            handle = self.transport.getHandle()
            return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (AttributeError, OSError):
            return False  # not a plain socket (TLS wrapper), or nothing to read

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if self._greeting_call is not None and self._greeting_call.active():
            self._greeting_call.cancel()
        if self._counted:
            self.factory.connections.release(self.peer_ip)
        log.info(
            "smtp session {listener} peer={peer} helo={helo} tls={tls} {transactions} "
            "rejected={rejected} time={elapsed:.3f}s",
            listener=self.service_name.lower(), peer=self.peer_ip, helo=self.helo or "-",
            tls="yes" if self.tls else "no",
            transactions=" ".join(self.session_log.transactions) or "messages=0",
            rejected=self.session_log.rejected, elapsed=time.monotonic() - self._started,
        )

    def timeoutConnection(self) -> None:
        self._send(Reply(421, "4.4.2", f"{self.hostname} Error: timeout exceeded"))
        self.close()

    def deadline_exceeded(self, name: str) -> None:
        what = {"command": "command line", "data": "message data",
                "session": "session"}.get(name, name)
        log.info("smtp {what} deadline passed peer={peer}", what=what, peer=self.peer_ip)
        self._send(Reply(421, "4.4.2", f"{self.hostname} Error: {what} took too long"))

    def _send(self, reply: Reply) -> None:
        if reply.code >= 400:
            self.session_log.rejected += 1
        if not self.gone:
            self.transport.write(reply.encode())

    # --- input ---------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if not self._greeted and not self.gone:
            self._send(Reply(554, "5.5.1", "Protocol error: command sent before the greeting"))
            self.close()
            return
        super().dataReceived(data)

    def line_too_long(self) -> None:
        self._junk_reply(Reply(500, "5.5.2", "Line too long"))

    def raw_mode(self) -> bool:
        return self._data is not None

    def line_received(self, line: bytes) -> defer.Deferred | None:
        if self._buffer and not self.esmtp:
            # More input came before our reply, and PIPELINING was not offered (no EHLO
            # answered yet): refused, as Postfix's smtpd_forbid_unauth_pipelining does.
            self._forbid_pipelining("command")
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._junk_reply(Reply(500, "5.5.2", "Syntax error: command is not UTF-8"))
            return None
        if "\r" in text or "\x00" in text:
            self._junk_reply(Reply(500, "5.5.2", "Syntax error: bare CR or NUL in command"))
            return None
        verb, _, argument = text.strip().partition(" ")
        handler = getattr(self, f"smtp_{verb.upper()}", None) if verb.isalpha() else None
        if handler is None:
            self._junk_reply(Reply(500, "5.5.2", "Error: command not recognized"))
            return None
        try:
            result = handler(argument.strip())
        except Exception:
            log.failure("smtp command {verb} failed", verb=verb.upper())
            result = Reply(451, "4.3.0", "Error: internal error, try again later")
        if isinstance(result, defer.Deferred):
            return self._answer_later(result)
        if result is not None:
            self._send(result)
        return None

    def _answer_later(self, d: defer.Deferred) -> defer.Deferred:
        """Send the reply `d` fires with; the caller holds input until then."""
        d.addErrback(self._internal_error)
        d.addCallback(lambda reply: None if reply is None or self.gone else self._send(reply))
        return d

    def _internal_error(self, failure: Any) -> Reply:
        log.failure("smtp hook failed", failure=failure)
        return Reply(451, "4.3.0", "Error: internal error, try again later")

    def _forbid_pipelining(self, what: str) -> None:
        self._junk += 1
        log.info("smtp improper pipelining of {what} peer={peer}", what=what, peer=self.peer_ip)
        self._send(Reply(554, "5.5.0", "Error: SMTP protocol synchronization"))
        self.close()

    def _junk_reply(self, reply: Reply) -> None:
        answer = self._junk_and(reply)
        if answer is not None:
            self._send(answer)

    # --- commands ------------------------------------------------------------------------
    def extensions(self) -> list[str]:
        exts = [f"SIZE {self.limits.max_message_size}", "PIPELINING", "8BITMIME", "SMTPUTF8",
                "ENHANCEDSTATUSCODES"]
        if self.factory.tls_options is not None and not self.tls:
            exts.append("STARTTLS")
        return exts

    def smtp_HELO(self, argument: str) -> Reply | None:
        if not argument or " " in argument:
            return self._junk_and(Reply(501, "5.5.4", "Syntax: HELO hostname"))
        self.helo, self.esmtp, self.transaction = argument, False, None
        return Reply(250, "", self.hostname)

    def smtp_EHLO(self, argument: str) -> Reply | None:
        if not argument or " " in argument:
            return self._junk_and(Reply(501, "5.5.4", "Syntax: EHLO hostname"))
        self.helo, self.esmtp, self.transaction = argument, True, None
        return Reply(250, "", "\n".join([self.hostname, *self.extensions()]))

    def smtp_NOOP(self, argument: str) -> Reply | None:
        return self._junk_and(Reply(250, "2.0.0", "Ok"))

    def smtp_HELP(self, argument: str) -> Reply | None:
        return self._junk_and(Reply(214, "2.0.0", "See RFC 5321"))

    def smtp_VRFY(self, argument: str) -> Reply | None:
        return self._junk_and(Reply(252, "2.5.0", "Cannot VRFY user; send mail and see"))

    def smtp_RSET(self, argument: str) -> Reply | None:
        self.transaction = None
        return self._junk_and(Reply(250, "2.0.0", "Ok"))

    def smtp_QUIT(self, argument: str) -> None:
        self._send(Reply(221, "2.0.0", f"{self.hostname} closing connection"))
        self.close()

    def smtp_STARTTLS(self, argument: str) -> Reply | None:
        if self.tls:
            return self._junk_and(Reply(503, "5.5.1", "Error: TLS already active"))
        if self.factory.tls_options is None:
            return self._junk_and(Reply(502, "5.5.1", "Error: command not implemented"))
        if argument:
            return self._junk_and(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        # RFC 3207 4.2: forget everything, including commands pipelined in plaintext.
        self.discard_input()
        self.helo, self.esmtp, self.transaction = None, False, None
        self.transport.startTLS(self.factory.tls_options)
        self.tls = True
        return None

    def smtp_MAIL(self, argument: str) -> Reply | defer.Deferred | None:
        self._excused = self.limits.max_recipients + 1  # until this MAIL is accepted
        if self.helo is None:
            return self._junk_and(Reply(503, "5.5.1", "Error: send HELO/EHLO first"))
        if self.transaction is not None:
            return self._junk_and(Reply(503, "5.5.1", "Error: nested MAIL command"))
        if not argument.upper().startswith("FROM:"):
            return self._junk_and(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        path, params = _split_path(argument[5:])
        txn = Transaction()
        for name, value in params:
            problem = self._mail_parameter(txn, name, value)
            if problem is not None:
                return self._junk_and(problem)
        try:
            txn.sender = parse_path(path)
        except AddressError as exc:
            return self._junk_and(Reply(553, "5.1.7", f"Bad sender address syntax: {exc}"))
        if txn.sender is not None and not txn.sender.is_ascii and not txn.smtputf8:
            return Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        if txn.declared_size is not None and txn.declared_size > self.limits.max_message_size:
            return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        return self._chain(self.check_sender(txn), self._sender_checked, txn)

    def _mail_parameter(self, txn: Transaction, name: str, value: str | None) -> Reply | None:
        """Apply one MAIL parameter (RFC 1870, 6152, 6531); the error reply if unacceptable."""
        if not self.esmtp:
            return Reply(555, "5.5.4", "MAIL parameters need EHLO")
        if name == "SIZE" and value is not None and value.isdigit() and len(value) < 20:
            txn.declared_size = int(value)
        elif name == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
            txn.body = value.upper()
        elif name == "SMTPUTF8" and value is None:
            txn.smtputf8 = True
        else:
            return Reply(555, "5.5.4", f"Unsupported MAIL parameter {name}")
        return None

    def _sender_checked(self, reply: Reply, txn: Transaction) -> Reply:
        if reply.ok:
            self.transaction = txn
            self._excused = 0
        return reply

    def _no_transaction(self) -> Reply | None:
        reply = Reply(503, "5.5.1", "Error: need MAIL command")
        if self._excused > 0:
            self._excused -= 1
            return reply
        return self._junk_and(reply)

    def smtp_RCPT(self, argument: str) -> Reply | defer.Deferred | None:
        txn = self.transaction
        if txn is None:
            return self._no_transaction()
        if not argument.upper().startswith("TO:"):
            return self._junk_and(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        path, params = _split_path(argument[3:])
        if params:
            return self._junk_and(Reply(555, "5.5.4", f"Unsupported RCPT parameter {params[0][0]}"))
        try:
            address = parse_path(path)
        except AddressError as exc:
            return self._junk_and(Reply(501, "5.1.3", f"Bad recipient address syntax: {exc}"))
        if address is None:
            return self._junk_and(Reply(501, "5.1.3", "Bad recipient address syntax"))
        if not address.is_ascii and not txn.smtputf8:
            return Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        if len(txn.recipients) >= self.limits.max_recipients:
            return Reply(452, "4.5.3", "Error: too many recipients")
        return self._chain(self.check_recipient(txn, address), self._recipient_checked,
                           txn, address)

    def _recipient_checked(self, result: tuple[Reply, Any], txn: Transaction,
                           address: Address) -> Reply:
        reply, data = result
        if reply.ok and txn is self.transaction:
            txn.recipients.append((address, data))
        return reply

    def smtp_DATA(self, argument: str) -> Reply | None:
        txn = self.transaction
        if txn is None:
            return self._no_transaction()
        if not txn.recipients:
            return self._junk_and(Reply(554, "5.5.1", "Error: no valid recipients"))
        if argument:
            return self._junk_and(Reply(501, "5.5.4", "Syntax: DATA"))
        if self._buffer:
            # RFC 2920 3.1: message text may only follow the 354, PIPELINING or not.
            self._forbid_pipelining("message text before the 354")
            return None
        self._data = bytearray(b"\r\n")
        self._data_scan = 0
        self._data_refusal = None
        self._data_received = 0
        self._data_started = self.factory.clock.seconds()
        self._headers = HeaderChecker(HeaderLimits(
            self.limits.max_header_field_size, self.limits.max_header_size,
            self.limits.max_header_fields), dot_stuffed=True)
        self.set_deadline("data", self._data_allowance())
        self._send(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))
        return None

    def _data_allowance(self) -> float:
        """Seconds left for DATA: command_timeout plus what the octets received so far have
        bought at min_data_rate, within the bound a message of the largest size gets."""
        limits = self.limits
        earned = min(self._data_received, limits.max_message_size) / limits.min_data_rate
        return (self._data_started + limits.command_timeout + earned
                - self.factory.clock.seconds())

    def smtp_BDAT(self, argument: str) -> Reply | None:
        return self._junk_and(Reply(502, "5.5.1", "Error: CHUNKING is not offered"))

    # --- DATA ----------------------------------------------------------------------------
    def consume_raw(self) -> bool:
        """Move buffered input into the message; True once end-of-data was seen."""
        assert self._data is not None
        start = len(self._data)
        self._data_received += len(self._buffer)
        self._data += self._buffer
        self._buffer.clear()
        end = self._data.find(b"\r\n.\r\n", self._data_scan)
        headers = self._headers
        if headers is not None and not headers.finished and self._data_refusal is None:
            # Only up to the end of data: what follows it is the next command.
            headers.feed(self._data[start: len(self._data) if end < 0 else end + 2])
            if headers.violation is not None:
                self._data_refusal = (
                    Reply(552, "5.3.4", f"Message header too large: {headers.violation}")
                    if headers.violation.kind == "size" else
                    Reply(554, "5.6.0", f"Malformed message header: {headers.violation}"))
        if end < 0:
            self._data_scan = max(0, len(self._data) - 4)
            if self._data_refusal is None and len(self._data) > self.limits.max_message_size + 4096:
                self._data_refusal = Reply(552, "5.3.4",
                                           "Message size exceeds fixed maximum message size")
            if self._data_refusal is not None:
                # Keep reading to the end marker, but stop keeping what we read.
                del self._data[: len(self._data) - 4]
                self._data_scan = 0
            self.set_deadline("data", self._data_allowance())
            return False
        self.set_deadline("data", None)
        self._buffer += self._data[end + 5:]
        body = bytes(self._data[2: end + 2])
        refusal, self._data_refusal = self._data_refusal, None
        self._data = self._headers = None
        if self._buffer and not self.esmtp:
            self._forbid_pipelining("a command after the end of data")
            return False
        self._finish_data(body, refusal)
        return True

    def _finish_data(self, body: bytes, refusal: Reply | None) -> None:
        txn, self.transaction = self.transaction, None
        assert txn is not None
        if refusal is None and len(body) > self.limits.max_message_size:
            refusal = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        if refusal is not None:
            self._send(refusal)
            self._note(txn, refusal.code, len(body))
            return
        crlf = body.count(b"\r\n")
        if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
            # RFC 5321 2.3.8: only CRLF ends a line; a bare CR or LF is how smuggling starts.
            self._send(Reply(550, "5.6.0", "Message refused: bare CR or LF in message; "
                                           "lines must end with CRLF"))
            self._note(txn, 550, len(body))
            return
        raw = (b"\r\n" + body).replace(b"\r\n.", b"\r\n")[2:]  # undo dot-stuffing
        d = defer.maybeDeferred(self.accept_message, txn, raw)
        d.addErrback(self._internal_error)
        d.addCallback(lambda reply: self._note(txn, reply.code, len(raw)) or reply)
        self.hold(self._answer_later(d))

    def _note(self, txn: Transaction, code: int, size: int) -> None:
        recipients = ",".join(f"<{address}>" for address, _ in txn.recipients)
        self.session_log.transactions.append(
            f"from=<{txn.sender_text}> to={recipients} size={size} result={code}")

    # --- helpers -------------------------------------------------------------------------
    def _junk_and(self, reply: Reply) -> Reply | None:
        """Count towards the junk limit (syntax and sequence errors, NOOP floods).

        Returns the reply to send, or None once the limit closed the session.
        """
        self._junk += 1
        if self._junk <= self.limits.max_junk_commands:
            return reply
        self._send(Reply(421, "4.7.0", f"{self.hostname} Error: too many errors"))
        self.close()
        return None

    @staticmethod
    def _chain(result: Any, then: Any, *args: Any) -> Any:
        """then(result, *args), at once for a plain answer, later for a Deferred one."""
        if isinstance(result, defer.Deferred):
            return result.addCallback(then, *args)
        return then(result, *args)

    # --- hooks ---------------------------------------------------------------------------
    def check_sender(self, txn: Transaction) -> Reply | defer.Deferred:
        """Decide MAIL FROM; txn.sender is parsed already."""
        raise NotImplementedError

    def check_recipient(self, txn: Transaction,
                        address: Address) -> tuple[Reply, Any] | defer.Deferred:
        """Decide RCPT TO: (reply, data kept with the recipient when accepted)."""
        raise NotImplementedError

    def accept_message(self, txn: Transaction, raw: bytes) -> Reply | defer.Deferred:
        """Store or queue the message; reply 250 only once it is committed."""
        raise NotImplementedError


def received_header(txn: Transaction, esmtp: bool, tls: bool, helo: str, peer_ip: str,
                    hostname: str, queue_id: str, authenticated: bool = False) -> bytes:
    """The Received: trace field (RFC 5321 4.4) with the RFC 3848 protocol name."""
    protocol = ("UTF8SMTP" if txn.smtputf8 else "ESMTP") if esmtp else "SMTP"
    if tls:
        protocol += "S"
    if authenticated:
        protocol += "A"
    recipient = f"\r\n\tfor <{txn.recipients[0][0]}>" if len(txn.recipients) == 1 else ""
    return (f"Received: from {helo} ([{peer_ip}])\r\n"
            f"\tby {hostname} (mailsuite) with {protocol} id {queue_id}{recipient};\r\n"
            f"\t{email.utils.formatdate(localtime=False)}\r\n").encode()


def _split_path(text: str) -> tuple[str, list[tuple[str, str | None]]]:
    """Split `<path> PARAM=value ...` (RFC 5321 4.1.2), tolerating a space after the colon."""
    text = text.lstrip()
    if text.startswith("<"):
        end = _path_end(text)
        path, rest = text[: end + 1], text[end + 1:]
    else:
        path, _, rest = text.partition(" ")
    params = []
    for word in rest.split():
        name, sep, value = word.partition("=")
        params.append((name.upper(), value if sep else None))
    return path, params


def _path_end(text: str) -> int:
    """Index of the `>` closing the path, skipping quoted strings."""
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return len(text) - 1
