"""A receiving SMTP server for tests: the "remote MX" that outbound delivery connects to.

It runs in background threads of the test process on real loopback sockets (not on the
Twisted reactor, which the tests do not run), speaks the ESMTP a delivering client needs
(PIPELINING, 8BITMIME, SMTPUTF8, SIZE, STARTTLS, AUTH PLAIN/LOGIN) and records what it
was sent::

    with SinkServer(rcpt_reply=by_local_part({"defer": (451, "4.2.0 try later")})) as sink:
        ...  # make mailsuite deliver to sink.address
        [msg] = sink.wait_for(1)
        assert msg.rcpts == ["bob@example.test"]

Mailsuite delivers to every MX on one configured port, so several sinks share one port on
different loopback addresses: ``port = free_port_on(["127.0.0.2", "127.0.0.3"])``.

The options are plain attributes: a test may change, say, ``sink.rcpt_reply`` between two
delivery attempts and the next command sees the new value.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import email
import email.policy
import ipaddress
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertAuthority", "Received", "SinkServer", "by_local_part", "free_port_on",
           "make_ca", "make_certificate"]

Reply = tuple[int, str]
CertKey = tuple[str | Path, str | Path]

CONNECTION_TIMEOUT = 30.0
# RFC 5321 allows 512 octets per command line; leave room for long parameters.
MAX_COMMAND_LINE = 4096
# The accept loop wakes this often to notice stop().
ACCEPT_POLL = 0.1
JOIN_TIMEOUT = 5.0

_MAIL = re.compile(r"(?i)FROM:\s*<([^>]*)>(.*)")
_RCPT = re.compile(r"(?i)TO:\s*<([^>]*)>(.*)")


@dataclass
class Received:
    """One message the sink accepted (or, in ``SinkServer.dropped``, read and then dropped)."""

    mail_from: str
    mail_params: dict[str, str | None]
    rcpts: list[str]  # only the accepted recipients
    data: bytes  # dot-stuffing removed, otherwise exactly as sent (CRLF kept)
    wire: bytes  # the bytes between the 354 reply and the final ".\r\n", still dot-stuffed
    tls: bool
    auth_user: str | None
    ehlo: str
    peer: str  # the client's IP address

    @property
    def message(self) -> Message:
        return email.message_from_bytes(self.data, policy=email.policy.default)


def by_local_part(mapping: dict[str, Reply],
                  default: Reply = (250, "2.1.5 Ok")) -> Callable[[str], Reply]:
    """An rcpt_reply policy: the reply for an address is looked up by its local part
    (case-insensitively), e.g. {"defer": (451, "4.2.0 try later")}; others get default."""
    table = {local.lower(): reply for local, reply in mapping.items()}

    def policy(address: str) -> Reply:
        local = address.rpartition("@")[0] if "@" in address else address
        return table.get(local.lower(), default)

    return policy


def free_port_on(hosts: Iterable[str], attempts: int = 50) -> int:
    """A TCP port that is free on every one of hosts right now (bind-tested on each)."""
    hosts = list(hosts)
    for _ in range(attempts):
        probes: list[socket.socket] = []
        try:
            probes.append(_bound_socket(hosts[0], 0))
            port: int = probes[0].getsockname()[1]
            for host in hosts[1:]:
                probes.append(_bound_socket(host, port))
            return port
        except OSError:
            continue  # taken on one of the other hosts: try another port
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"no TCP port free on all of {hosts} after {attempts} attempts")


def _bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        # As the server does, so a port left in TIME_WAIT by an earlier test still counts.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Closed(Exception):
    """The connection is over: the client went away, or the sink drops it on purpose."""


class _LineTooLong(Exception):
    pass


class _AuthCancelled(Exception):
    pass


class SinkServer:
    """A receiving SMTP server on host:port (port 0: any free one), in background threads."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 hostname: str = "sink.test",
                 greeting: Reply | None = None,
                 pipelining: bool = True,
                 eightbitmime: bool = True,
                 smtputf8: bool = True,
                 enhancedstatuscodes: bool = True,
                 size: int | None = None,
                 starttls: CertKey | None = None,
                 implicit_tls: CertKey | None = None,
                 auth: tuple[str, str] | None = None,
                 auth_plaintext: bool = False,
                 mail_reply: Callable[[str], Reply] | None = None,
                 rcpt_reply: Callable[[str], Reply] | None = None,
                 data_reply: Callable[[bytes], Reply] | None = None,
                 delay: float = 0.0,
                 drop_after_data: bool = False,
                 timeout: float = CONNECTION_TIMEOUT) -> None:
        self.host, self.port = host, port
        self.hostname = hostname
        self.greeting = greeting or (220, f"{hostname} ESMTP sink")
        self.pipelining, self.eightbitmime, self.smtputf8 = pipelining, eightbitmime, smtputf8
        self.enhancedstatuscodes, self.size = enhancedstatuscodes, size
        self.starttls, self.implicit_tls = starttls, implicit_tls
        self.auth, self.auth_plaintext = auth, auth_plaintext
        self.mail_reply, self.rcpt_reply, self.data_reply = mail_reply, rcpt_reply, data_reply
        self.delay, self.drop_after_data, self.timeout = delay, drop_after_data, timeout

        # What was seen; read them freely, they are only ever appended to or incremented.
        self.messages: list[Received] = []
        self.dropped: list[Received] = []  # read in full, then cut off by drop_after_data
        self.rcpt_log: list[tuple[str, int]] = []  # every RCPT attempt and the reply code
        self.commands: list[str] = []  # every command line, all connections interleaved
        self.errors: list[BaseException] = []  # exceptions from callbacks or the sink itself
        self.connections = 0
        self.max_concurrent = 0
        self.tls_failures = 0

        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._sessions: set[_Session] = set()
        self._starttls_ctx: ssl.SSLContext | None = None
        self._implicit_ctx: ssl.SSLContext | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def start(self) -> SinkServer:
        if self._listener is not None:
            raise RuntimeError("SinkServer already started")
        self._starttls_ctx = _server_context(self.starttls) if self.starttls else None
        self._implicit_ctx = _server_context(self.implicit_tls) if self.implicit_tls else None
        self._listener = _bound_socket(self.host, self.port)
        self._listener.listen(64)
        self._listener.settimeout(ACCEPT_POLL)
        self.port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"smtpsink-{self.host}:{self.port}", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every client connection; waits a few seconds at most."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(JOIN_TIMEOUT)
        if self._listener is not None:
            self._listener.close()
        with self._cond:
            sessions = list(self._sessions)
        for session in sessions:
            session.abort()
        deadline = time.monotonic() + JOIN_TIMEOUT
        for session in sessions:
            session.thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> SinkServer:
        return self if self._listener is not None else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least count messages were accepted; returns all of them."""
        with self._cond:
            if self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                return list(self.messages)
            raise AssertionError(
                f"expected {count} message(s) at {self.host}:{self.port} within {timeout}s, "
                f"got {len(self.messages)}; connections={self.connections}, "
                f"rcpt_log={self.rcpt_log}, dropped={len(self.dropped)}, "
                f"tls_failures={self.tls_failures}, errors={self.errors!r}, "
                f"last commands={self.commands[-10:]}")

    # ----------------------------------------------------------------- threads

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(self.timeout)
            session = _Session(self, sock, addr[0])
            with self._cond:
                self.connections += 1
                self._sessions.add(session)
                self.max_concurrent = max(self.max_concurrent, len(self._sessions))
            session.thread.start()

    def _serve(self, session: _Session) -> None:
        try:
            session.run()
        except (_Closed, OSError):
            pass  # the client went away, timed out, or stop() cut it off
        except Exception as exc:  # a bug, or a raising callback: report it, don't hide it
            self.errors.append(exc)
            with contextlib.suppress(OSError):
                session.sock.sendall(f"421 4.3.0 sink error: {exc!r}\r\n".encode())
        finally:
            session.sock.close()
            with self._cond:
                self._sessions.discard(session)

    def _record(self, received: Received, accepted: bool) -> None:
        with self._cond:
            (self.messages if accepted else self.dropped).append(received)
            self._cond.notify_all()


def _server_context(cert_key: CertKey) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert_key[0]), str(cert_key[1]))
    return context


class _Session:
    """One client connection, served by its own thread."""

    def __init__(self, server: SinkServer, sock: socket.socket, peer: str) -> None:
        self.server, self.sock, self.peer = server, sock, peer
        self.thread = threading.Thread(target=server._serve, args=(self,), daemon=True,
                                       name=f"smtpsink-session-{peer}")
        self.buf = bytearray()
        self.tls = False
        self.ehlo: str | None = None
        self.auth_user: str | None = None
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_params: dict[str, str | None] = {}
        self.rcpts: list[str] = []

    def abort(self) -> None:
        # The plain socket shutdown works on an SSLSocket too and wakes a blocked recv().
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    # ------------------------------------------------------------- wire level

    def readline(self, limit: int | None) -> bytes:
        """One line including its LF (a bare LF ends a line too; the caller decides)."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end + 1])
                del self.buf[:end + 1]
                return line
            if limit is not None and len(self.buf) > limit:
                raise _LineTooLong
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed
            self.buf += chunk

    def reply(self, code: int, text: str) -> None:
        if self.server.delay and self.server._stopping.wait(self.server.delay):
            raise _Closed
        lines = text.split("\n")
        out = "".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n"
                      for i, line in enumerate(lines))
        self.sock.sendall(out.encode("utf-8"))

    def start_tls(self, context: ssl.SSLContext) -> None:
        tls_sock = context.wrap_socket(self.sock, server_side=True,
                                       do_handshake_on_connect=False)
        self.sock = tls_sock  # before the handshake, so that stop() can interrupt it
        if self.server._stopping.is_set():
            raise _Closed
        try:
            tls_sock.do_handshake()
        except OSError as exc:  # ssl.SSLError included
            with self.server._cond:
                self.server.tls_failures += 1
            raise _Closed from exc
        self.tls = True

    # ---------------------------------------------------------------- protocol

    def run(self) -> None:
        if self.server._implicit_ctx is not None:
            self.start_tls(self.server._implicit_ctx)
        greeting_code, text = self.server.greeting
        self.reply(greeting_code, text)
        if greeting_code == 421:
            return
        handlers: dict[str, Callable[[str], None]] = {
            "EHLO": self.do_ehlo, "HELO": self.do_helo, "MAIL": self.do_mail,
            "RCPT": self.do_rcpt, "DATA": self.do_data, "RSET": self.do_rset,
            "NOOP": self.do_noop, "STARTTLS": self.do_starttls, "AUTH": self.do_auth,
        }
        while True:
            try:
                line = self.readline(MAX_COMMAND_LINE)
            except _LineTooLong:
                self.reply(500, "5.5.2 Line too long")
                return
            command = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            self.server.commands.append(command)
            verb, _, arg = command.partition(" ")
            verb = verb.upper()
            if verb == "QUIT":
                self.reply(221, "2.0.0 Bye")
                return
            if greeting_code >= 300:  # refused at the greeting: only QUIT (RFC 5321 3.1)
                self.reply(503, "5.5.1 No service")
            elif verb in handlers:
                handlers[verb](arg.strip())
            else:
                self.reply(500, "5.5.2 Command not recognized")

    def auth_offered(self) -> bool:
        return self.server.auth is not None and (self.tls or self.server.auth_plaintext)

    def do_ehlo(self, arg: str) -> None:
        srv = self.server
        if not arg:
            return self.reply(501, "5.5.4 EHLO needs a domain")
        self.ehlo = arg
        self.reset()
        lines = [f"{srv.hostname} greets {arg}"]
        lines += ["PIPELINING"] if srv.pipelining else []
        lines += ["8BITMIME"] if srv.eightbitmime else []
        lines += ["SMTPUTF8"] if srv.smtputf8 else []
        lines += ["ENHANCEDSTATUSCODES"] if srv.enhancedstatuscodes else []
        lines += [f"SIZE {srv.size}"] if srv.size is not None else []
        lines += ["STARTTLS"] if srv._starttls_ctx is not None and not self.tls else []
        lines += ["AUTH PLAIN LOGIN"] if self.auth_offered() else []
        self.reply(250, "\n".join(lines))

    def do_helo(self, arg: str) -> None:
        if not arg:
            return self.reply(501, "5.5.4 HELO needs a domain")
        self.ehlo = arg
        self.reset()
        self.reply(250, self.server.hostname)

    def do_mail(self, arg: str) -> None:
        srv = self.server
        match = _MAIL.fullmatch(arg)
        if self.ehlo is None:
            return self.reply(503, "5.5.1 Send EHLO first")
        if self.mail_from is not None:
            return self.reply(503, "5.5.1 Nested MAIL command")
        if srv.auth is not None and self.auth_user is None:
            return self.reply(530, "5.7.0 Authentication required")
        if not match:
            return self.reply(501, "5.5.4 Syntax: MAIL FROM:<address> [parameters]")
        address, params = match[1], _parse_params(match[2])
        problem = self.check_mail_params(params) or _check_ascii(address, params)
        if problem:
            return self.reply(*problem)
        code, text = srv.mail_reply(address) if srv.mail_reply else (250, "2.1.0 Ok")
        if 200 <= code < 300:
            self.mail_from, self.mail_params = address, params
        self.reply(code, text)

    def check_mail_params(self, params: dict[str, str | None]) -> Reply | None:
        """The reply refusing MAIL for its parameters, if any: the sink is strict so that a
        client using an extension the server did not advertise gets caught."""
        srv = self.server
        offered = {"SIZE": srv.size is not None, "BODY": True, "SMTPUTF8": srv.smtputf8,
                   "AUTH": self.auth_offered()}
        for key in params:
            if not offered.get(key):
                return 555, f"5.5.4 Unsupported MAIL parameter {key}"
        body = (params.get("BODY") or "").upper()
        if "BODY" in params and body not in ("7BIT", "8BITMIME"):
            return 501, "5.5.4 Bad BODY parameter"
        if body == "8BITMIME" and not srv.eightbitmime:
            return 555, "5.5.4 BODY=8BITMIME not supported"
        declared = params.get("SIZE", "0") or ""
        if not declared.isdigit():
            return 501, "5.5.4 Bad SIZE parameter"
        if srv.size is not None and int(declared) > srv.size:
            return 552, "5.3.4 Message size exceeds fixed maximum message size"
        return None

    def do_rcpt(self, arg: str) -> None:
        srv = self.server
        if self.mail_from is None:
            return self.reply(503, "5.5.1 Need MAIL first")
        match = _RCPT.fullmatch(arg)
        if not match:
            return self.reply(501, "5.5.4 Syntax: RCPT TO:<address>")
        address = match[1]
        if match[2].strip():
            code, text = 555, "5.5.4 RCPT parameters not supported"
        else:
            code, text = (_check_ascii(address, self.mail_params)
                          or (srv.rcpt_reply(address) if srv.rcpt_reply
                              else (250, "2.1.5 Ok")))
        # Logged before the reply goes out, so a client that saw it can assert on the log.
        with srv._cond:
            srv.rcpt_log.append((address, code))
        if 200 <= code < 300:
            self.rcpts.append(address)
        self.reply(code, text)

    def do_data(self, arg: str) -> None:
        srv = self.server
        if self.mail_from is None:
            return self.reply(503, "5.5.1 Need MAIL first")
        if not self.rcpts:
            return self.reply(554, "5.5.1 No valid recipients")
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        wire, data = self.read_data()
        received = Received(self.mail_from, self.mail_params, self.rcpts, data, wire, self.tls,
                            self.auth_user, self.ehlo or "", self.peer)
        self.reset()
        if srv.drop_after_data:
            srv._record(received, accepted=False)
            raise _Closed  # a crash mid-delivery: no reply at all
        if srv.size is not None and len(data) > srv.size:
            return self.reply(552, "5.3.4 Message size exceeds fixed maximum message size")
        code, text = srv.data_reply(data) if srv.data_reply else (250, "2.0.0 queued")
        if 200 <= code < 300:
            srv._record(received, accepted=True)
        self.reply(code, text)

    def read_data(self) -> tuple[bytes, bytes]:
        """(wire, data) up to CRLF.CRLF. Only a "." line after a CRLF ends the data, so a
        "." after a bare LF (SMTP smuggling) stays content; likewise only a dot after a CRLF
        is dot-stuffing and removed."""
        wire, data = bytearray(), bytearray()
        after_crlf = True  # the 354 reply's CRLF counts for the first line
        while True:
            line = self.readline(None)
            if after_crlf and line == b".\r\n":
                return bytes(wire), bytes(data)
            wire += line
            data += line[1:] if after_crlf and line.startswith(b".") else line
            after_crlf = line.endswith(b"\r\n")

    def do_rset(self, arg: str) -> None:
        self.reset()
        self.reply(250, "2.0.0 Ok")

    def do_noop(self, arg: str) -> None:
        self.reply(250, "2.0.0 Ok")

    def do_starttls(self, arg: str) -> None:
        context = self.server._starttls_ctx
        if context is None:
            return self.reply(502, "5.5.1 STARTTLS not offered")
        if self.tls:
            return self.reply(503, "5.5.1 TLS already active")
        self.reply(220, "2.0.0 Ready to start TLS")
        # RFC 3207 4.2: plaintext pipelined after STARTTLS must not count (injection).
        self.buf.clear()
        self.start_tls(context)
        # ... and nothing learnt before TLS is kept either: the client must EHLO again.
        self.ehlo, self.auth_user = None, None
        self.reset()

    def do_auth(self, arg: str) -> None:
        srv = self.server
        if srv.auth is None:
            return self.reply(502, "5.5.1 AUTH not offered")
        if not self.auth_offered():
            return self.reply(538, "5.7.11 Encryption required for requested authentication")
        if self.auth_user is not None or self.mail_from is not None:
            return self.reply(503, "5.5.1 AUTH not allowed now")
        mechanism, _, initial = arg.partition(" ")
        try:
            if mechanism.upper() == "PLAIN":
                parts = _b64(initial or self.challenge("")).split(b"\0")
                if len(parts) != 3:
                    return self.reply(501, "5.5.2 Malformed PLAIN response")
                user, password = parts[1], parts[2]
            elif mechanism.upper() == "LOGIN":
                user = _b64(initial or self.challenge(_b64text("Username:")))
                password = _b64(self.challenge(_b64text("Password:")))
            else:
                return self.reply(504, "5.5.4 Unrecognized authentication type")
        except _AuthCancelled:
            return self.reply(501, "5.0.0 Authentication cancelled")
        except (binascii.Error, ValueError):
            return self.reply(501, "5.5.2 Cannot decode response")
        if (user.decode(errors="replace"), password.decode(errors="replace")) != srv.auth:
            return self.reply(535, "5.7.8 Authentication credentials invalid")
        self.auth_user = user.decode()
        self.reply(235, "2.7.0 Authentication successful")

    def challenge(self, text: str) -> str:
        self.reply(334, text)
        response = self.readline(MAX_COMMAND_LINE).strip().decode("ascii", "replace")
        if response == "*":
            raise _AuthCancelled
        return response


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        params[key.upper()] = value if eq else None
    return params


def _check_ascii(address: str, mail_params: dict[str, str | None]) -> Reply | None:
    # RFC 6531: a non-ASCII address is only valid in a transaction that declared SMTPUTF8.
    if not address.isascii() and "SMTPUTF8" not in mail_params:
        return 553, "5.6.7 Non-ASCII address needs SMTPUTF8"
    return None


def _b64(text: str) -> bytes:
    return b"" if text == "=" else base64.b64decode(text, validate=True)  # "=": empty


def _b64text(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class CertAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def make_ca(dir: Path, name: str = "Mailsuite Test CA") -> tuple[Path, Path, CertAuthority]:
    """A test CA: (cert path, key path, CertAuthority), the tuple make_certificate takes."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return (*_write(dir, "ca", cert, key), CertAuthority(cert, key))


def make_certificate(dir: Path, hostname: str,
                     ca: tuple[Path, Path, CertAuthority] | CertAuthority | None = None,
                     ) -> tuple[Path, Path]:
    """A server certificate and key for hostname (also in subjectAltName; an IP address
    goes in as one), self-signed or issued by ca (as returned by make_ca)."""
    if isinstance(ca, tuple):
        ca = ca[2]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    issuer, signer = (ca.cert.subject, ca.key) if ca else (subject, key)
    try:
        name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        name = x509.DNSName(hostname)
    builder = (_builder(subject, issuer, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.SubjectAlternativeName([name]), critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   signer.public_key()), critical=False))
    return _write(dir, hostname, builder.sign(signer, hashes.SHA256()), key)


def _builder(subject: x509.Name, issuer: x509.Name,
             public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False))


def _write(dir: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    stem = f"{stem}-{secrets.token_hex(4)}"  # several certificates for one name may coexist
    cert_path, key_path = dir / f"{stem}.crt", dir / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
