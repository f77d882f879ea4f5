"""POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595) and AUTH PLAIN (RFC 5034).

The maildrop is the account's INBOX as it was at login, numbered 1..n. DELE only marks;
the marked messages are expunged when QUIT ends the TRANSACTION state (the UPDATE state),
so a dropped connection deletes nothing. A lease in the store keeps a second session,
in this process or another sharing the database, out of the maildrop meanwhile.

Written on our own line protocol rather than twisted.mail.pop3, which has no STLS, no
AUTH PLAIN per RFC 5034 and advertises capabilities it does not have.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from twisted.internet import defer, interfaces, protocol
from twisted.logger import Logger
from zope.interface import implementer

from mailsuite.auth import Authenticator, SASLError, decode_sasl_plain
from mailsuite.config import Config
from mailsuite.lineproto import SerialLineProtocol
from mailsuite.mime import split_message
from mailsuite.netlimits import ConnectionCounter
from mailsuite.store import AccountRow, AsyncStore, Listing

log = Logger(namespace="mailsuite.pop3")

MAX_LINE = 255  # RFC 2449 4: commands are at most 255 octets including CRLF


class POP3Factory(protocol.ServerFactory):
    def __init__(self, config: Config, store: AsyncStore, authenticator: Authenticator,
                 tls_options: Any | None, connections: ConnectionCounter, lease_prefix: str,
                 implicit_tls: bool = False) -> None:
        self.config = config
        self.store = store
        self.authenticator = authenticator
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls
        self.connections = connections  # shared by pop3 and pop3s
        self.lease_prefix = lease_prefix  # this process's leases, released at shutdown

    def buildProtocol(self, addr: Any) -> POP3Server:
        proto = POP3Server()
        proto.factory = self
        return proto


@implementer(interfaces.IPullProducer)
class _ChunkProducer:
    """Writes one large response in pieces, as fast as the client reads them."""

    chunk_size = 65536

    def __init__(self, transport: Any, data: bytes) -> None:
        self.transport = transport
        self.data = memoryview(data)
        self.offset = 0
        self.done: defer.Deferred = defer.Deferred()

    def start(self) -> defer.Deferred:
        self.transport.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        piece = self.data[self.offset:self.offset + self.chunk_size]
        self.offset += len(piece)
        if piece:
            self.transport.write(bytes(piece))
        if self.offset >= len(self.data):
            self.transport.unregisterProducer()
            if not self.done.called:
                self.done.callback(None)

    def stopProducing(self) -> None:
        if not self.done.called:
            self.done.callback(None)


def dot_stuff(raw: bytes) -> bytes:
    """The multi-line response body for `raw`: CRLF lines, dot-stuffed, ending CRLF.CRLF."""
    if b"\r" in raw.replace(b"\r\n", b"") or b"\n" in raw.replace(b"\r\n", b""):
        # A bare CR or LF (possible in APPENDed mail) would let a lone "." end us early.
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if raw and not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    return (b"\r\n" + raw).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


# Which commands each state accepts (RFC 1939 3-6, RFC 2449, RFC 2595, RFC 5034).
_STATES = {
    "CAPA": ("AUTHORIZATION", "TRANSACTION"),
    "STLS": ("AUTHORIZATION",),
    "USER": ("AUTHORIZATION",),
    "PASS": ("AUTHORIZATION",),
    "AUTH": ("AUTHORIZATION",),
    "STAT": ("TRANSACTION",),
    "LIST": ("TRANSACTION",),
    "UIDL": ("TRANSACTION",),
    "RETR": ("TRANSACTION",),
    "TOP": ("TRANSACTION",),
    "DELE": ("TRANSACTION",),
    "NOOP": ("TRANSACTION",),
    "RSET": ("TRANSACTION",),
    "QUIT": ("AUTHORIZATION", "TRANSACTION"),
}


class POP3Server(SerialLineProtocol):
    factory: POP3Factory
    max_line = MAX_LINE

    def __init__(self) -> None:
        super().__init__()
        self.state = "AUTHORIZATION"
        self.tls = False
        self.peer = ""
        self.user: str | None = None
        self.account: AccountRow | None = None
        self.listing: Listing | None = None
        self.deleted: set[int] = set()  # message numbers marked by DELE
        self._holder = ""
        self._lease_taken = 0.0
        self._sasl_pending = False
        self._counted = False
        self._started = time.monotonic()
        self._retrieved = 0
        self._lock_released = False

    # --- connection ----------------------------------------------------------------------
    @property
    def store(self) -> AsyncStore:
        return self.factory.store

    @property
    def auth_allowed(self) -> bool:
        return self.tls or self.factory.config.auth.allow_plaintext

    @property
    def lock_name(self) -> str:
        assert self.account is not None
        return f"pop3:{self.account.id}"

    @property
    def lease_seconds(self) -> float:
        return self.factory.config.pop3.idle_timeout + 60

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.tls = self.factory.implicit_tls
        if not self.factory.connections.acquire(self.peer):
            self.send("-ERR [SYS/TEMP] too many connections from your address")
            self.close()
            return
        self._counted = True
        self._holder = f"{self.factory.lease_prefix}:{secrets.token_hex(8)}"
        self.setTimeout(self.factory.config.pop3.idle_timeout)
        self.command_deadline = self.factory.config.pop3.command_timeout
        self.set_deadline("login", self.factory.config.pop3.login_timeout)
        self.send("+OK mailsuite POP3 server ready")

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if self._counted:
            self.factory.connections.release(self.peer)
        self._release_lock()
        log.info("pop3 session peer={peer} user={user} tls={tls} retrieved={retrieved} "
                 "deleted={deleted} state={state} time={elapsed:.3f}s",
                 peer=self.peer, user=self.account.address if self.account else "-",
                 tls="yes" if self.tls else "no", retrieved=self._retrieved,
                 deleted=len(self.deleted), state=self.state,
                 elapsed=time.monotonic() - self._started)

    def timeoutConnection(self) -> None:
        # RFC 1939 3: an autologout timer ends the session without entering UPDATE.
        self.send("-ERR [SYS/TEMP] autologout: idle for too long")
        self.close()

    def deadline_exceeded(self, name: str) -> None:
        what = "login" if name == "login" else "command line"
        self.send(f"-ERR [SYS/TEMP] {what} took too long")

    def send(self, line: str) -> None:
        if not self.gone:
            self.transport.write(line.encode("utf-8") + b"\r\n")

    def line_too_long(self) -> None:
        self.send(f"-ERR command line longer than {MAX_LINE} octets")

    # --- dispatch ------------------------------------------------------------------------
    def line_received(self, line: bytes) -> defer.Deferred | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.send("-ERR command is not UTF-8")
            return None
        if self._sasl_pending:
            self._sasl_pending = False
            return self._sasl_plain(text)
        verb, _, rest = text.partition(" ")
        args = rest.split(" ") if rest else []
        handler = getattr(self, f"pop_{verb.upper()}", None) if verb.isalpha() else None
        if handler is None:
            self.send("-ERR unknown command")
            return None
        if self.state not in _STATES[verb.upper()]:
            self.send(f"-ERR {verb.upper()} is not valid in the {self.state} state")
            return None
        self._refresh_lease()
        return handler(args)

    # --- AUTHORIZATION -------------------------------------------------------------------
    def pop_CAPA(self, args: list[str]) -> None:
        if args:
            self.send("-ERR CAPA takes no arguments")
            return
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        # USER and SASL are announced in both states (RFC 2449 5, 6.2, 6.3); STLS only
        # where it can still be used (RFC 2595 4).
        if self.auth_allowed:
            caps += ["USER", "SASL PLAIN"]
        if self.state == "AUTHORIZATION" and self.factory.tls_options is not None \
                and not self.tls:
            caps.append("STLS")
        caps.append("IMPLEMENTATION mailsuite")
        self.transport.write(("+OK Capability list follows\r\n" + "".join(
            f"{cap}\r\n" for cap in caps) + ".\r\n").encode())


    def pop_STLS(self, args: list[str]) -> None:
        if self.tls:
            self.send("-ERR TLS already active")
        elif self.factory.tls_options is None:
            self.send("-ERR TLS not available")
        elif args:
            self.send("-ERR STLS takes no arguments")
        else:
            self.send("+OK Begin TLS negotiation")
            self.discard_input()  # RFC 2595 4: nothing sent before the handshake counts
            self.user = None
            self.transport.startTLS(self.factory.tls_options)
            self.tls = True


    def pop_USER(self, args: list[str]) -> None:
        if not self.auth_allowed:
            self.send("-ERR [AUTH] plaintext login refused; use STLS first")
        elif len(args) != 1 or not args[0]:
            self.send("-ERR usage: USER name")
        else:
            self.user = args[0]
            self.send("+OK send PASS")


    def pop_PASS(self, args: list[str]) -> defer.Deferred | None:
        if not self.auth_allowed:
            self.send("-ERR [AUTH] plaintext login refused; use STLS first")
            return None
        if self.user is None:
            self.send("-ERR USER first")
            return None
        user, self.user = self.user, None
        return self._login(user, " ".join(args))  # a password may contain spaces


    def pop_AUTH(self, args: list[str]) -> defer.Deferred | None:
        if not args:
            self.transport.write(b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n")
            return None
        if not self.auth_allowed:
            self.send("-ERR [AUTH] plaintext login refused; use STLS first")
            return None
        if args[0].upper() != "PLAIN" or len(args) > 2:
            self.send("-ERR unsupported SASL mechanism")
            return None
        if len(args) == 2:
            return self._sasl_plain(args[1])
        self._sasl_pending = True
        self.send("+ ")
        return None


    def _sasl_plain(self, response: str) -> defer.Deferred | None:
        if response.strip() == "*":
            self.send("-ERR authentication cancelled")
            return None
        try:
            user, password = decode_sasl_plain(response)
        except SASLError as exc:
            self.send(f"-ERR [AUTH] {exc}")
            return None
        return self._login(user, password)

    def _login(self, user: str, password: str) -> defer.Deferred:
        d = self.factory.authenticator.login(user, password, self.peer)
        d.addCallback(self._logged_in)
        d.addErrback(self._temporary_failure, "login")
        return d

    def _logged_in(self, account: AccountRow | None) -> defer.Deferred | None:
        if account is None:
            self.send("-ERR [AUTH] authentication failed")
            if self.factory.authenticator.should_disconnect(self.peer):
                self.close()
            return None
        d = self.store.lock_acquire(f"pop3:{account.id}", self._holder, self.lease_seconds)
        d.addCallback(self._locked, account)
        return d

    def _locked(self, acquired: bool, account: AccountRow) -> defer.Deferred | None:
        if acquired and self.gone:
            # The client left while we were taking the lease: connectionLost has run.
            return self.store.lock_release(f"pop3:{account.id}", self._holder)
        if not acquired:
            self.send("-ERR [IN-USE] maildrop is locked by another session")
            return None
        self.account = account
        self._lease_taken = time.monotonic()
        d = self.store.listing(account.id, "INBOX")
        d.addCallback(self._opened)
        return d

    def _opened(self, listing: Listing) -> None:
        self.listing = listing
        self.state = "TRANSACTION"
        self.set_deadline("login", None)
        total = sum(size for _, size in listing.messages)
        self.send(f"+OK maildrop has {len(listing.messages)} messages ({total} octets)")

    def _temporary_failure(self, failure: Any, what: str) -> None:
        log.failure("pop3 {what} failed", failure=failure, what=what)
        self.send("-ERR [SYS/TEMP] temporary failure, try again later")

    def _refresh_lease(self) -> None:
        """Renew the maildrop lease while the session is in use, well before it expires."""
        if self.state != "TRANSACTION" or self.account is None:
            return
        if time.monotonic() - self._lease_taken < self.lease_seconds / 3:
            return
        self._lease_taken = time.monotonic()
        self.store.lock_acquire(self.lock_name, self._holder, self.lease_seconds).addErrback(
            lambda f: log.failure("renewing the maildrop lease failed", failure=f))

    # --- TRANSACTION ---------------------------------------------------------------------
    def _message(self, args: list[str], count: int = 1) -> int | None:
        """The message number in args[0] if it names an undeleted message, else None."""
        assert self.listing is not None
        if len(args) != count:
            self.send("-ERR wrong number of arguments")
            return None
        word = args[0]
        if not (word.isascii() and word.isdigit()) or len(word) > 9:
            self.send("-ERR invalid message number")
            return None
        number = int(word)
        if not 1 <= number <= len(self.listing.messages) or number in self.deleted:
            self.send("-ERR no such message")
            return None
        return number

    def _live(self) -> list[tuple[int, int, int]]:
        """(number, uid, size) of every message not marked deleted."""
        assert self.listing is not None
        return [(n, uid, size) for n, (uid, size) in enumerate(self.listing.messages, 1)
                if n not in self.deleted]

    def pop_STAT(self, args: list[str]) -> None:
        if args:
            self.send("-ERR STAT takes no arguments")
            return
        live = self._live()
        self.send(f"+OK {len(live)} {sum(size for _, _, size in live)}")


    def pop_LIST(self, args: list[str]) -> None:
        self._scan_listing(args, "scan listing", lambda uid, size: str(size))


    def pop_UIDL(self, args: list[str]) -> None:
        assert self.listing is not None
        validity = self.listing.uidvalidity
        # UIDVALIDITY.UID never repeats for this INBOX, across sessions and restarts.
        self._scan_listing(args, "unique-id listing", lambda uid, size: f"{validity}.{uid}")


    def _scan_listing(self, args: list[str], title: str, value: Any) -> None:
        assert self.listing is not None
        if args:
            number = self._message(args)
            if number is not None:
                uid, size = self.listing.messages[number - 1]
                self.send(f"+OK {number} {value(uid, size)}")
            return
        lines = [f"{n} {value(uid, size)}\r\n" for n, uid, size in self._live()]
        self.transport.write(f"+OK {title} follows\r\n{''.join(lines)}.\r\n".encode())

    def pop_RETR(self, args: list[str]) -> defer.Deferred | None:
        number = self._message(args)
        if number is None:
            return None
        return self._send_message(number, None)


    def pop_TOP(self, args: list[str]) -> defer.Deferred | None:
        number = self._message(args[:1]) if len(args) == 2 else self._message(args, 2)
        if number is None:
            return None
        lines = args[1]
        if not (lines.isascii() and lines.isdigit()):
            self.send("-ERR invalid line count")
            return None
        # RFC 1939: a count beyond the body sends all of it; no need to parse 50 digits.
        return self._send_message(number, int(lines[:10]) if len(lines) <= 10 else 10**10)


    def _send_message(self, number: int, top_lines: int | None) -> defer.Deferred:
        assert self.listing is not None and self.account is not None
        uid, size = self.listing.messages[number - 1]
        d = self.store.message_bytes(self.account.id, "INBOX", uid)
        d.addCallback(self._stream, uid, size, top_lines)
        d.addErrback(self._temporary_failure, "RETR")
        return d

    def _stream(self, raw: bytes | None, uid: int, size: int,
                top_lines: int | None) -> defer.Deferred | None:
        if raw is None:
            self.send("-ERR [SYS/PERM] message was removed by another session")
            return None
        if top_lines is not None:
            header, body = split_message(raw)
            lines = body.split(b"\r\n")
            raw = header + b"\r\n" + b"\r\n".join(lines[:top_lines])
        self.send(f"+OK {size} octets" if top_lines is None else "+OK top of message follows")
        d = _ChunkProducer(self.transport, dot_stuff(raw)).start()
        if top_lines is None:
            self._retrieved += 1
            assert self.account is not None
            d.addCallback(lambda _: self.store.add_flag(self.account.id, "INBOX", [uid],
                                                        "\\Seen"))
        return d

    def pop_DELE(self, args: list[str]) -> None:
        number = self._message(args)
        if number is not None:
            self.deleted.add(number)
            self.send(f"+OK message {number} deleted")


    def pop_NOOP(self, args: list[str]) -> None:
        self.send("+OK" if not args else "-ERR NOOP takes no arguments")


    def pop_RSET(self, args: list[str]) -> None:
        if args:
            self.send("-ERR RSET takes no arguments")
            return
        self.deleted.clear()
        self.send(f"+OK maildrop has {len(self._live())} messages")


    def pop_QUIT(self, args: list[str]) -> defer.Deferred | None:
        if args:
            self.send("-ERR QUIT takes no arguments")
            return None
        if self.state != "TRANSACTION":
            self.send("+OK mailsuite POP3 server signing off")
            self.close()
            return None
        # The UPDATE state: remove what DELE marked, give the maildrop back, then say goodbye
        # (a client that reconnects at once must find the maildrop free).
        self.state = "UPDATE"
        assert self.listing is not None and self.account is not None
        uids = [self.listing.messages[n - 1][0] for n in sorted(self.deleted)]
        d = self.store.expunge(self.account.id, "INBOX", uids) if uids else defer.succeed(0)
        d.addCallbacks(
            lambda removed: self._release_lock().addCallback(
                lambda _: self.send(f"+OK signing off ({removed} messages deleted)")),
            lambda failure: self._temporary_failure(failure, "expunge"))
        d.addBoth(lambda _: self.close())
        return d

    def _release_lock(self) -> defer.Deferred:
        if self.account is None or self.listing is None or self._lock_released:
            return defer.succeed(None)
        self._lock_released = True
        d = self.store.lock_release(self.lock_name, self._holder)
        d.addErrback(lambda f: log.failure("releasing the maildrop lock failed", failure=f))
        return d

