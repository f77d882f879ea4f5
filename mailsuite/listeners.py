"""Listening sockets: shared by several processes (SO_REUSEPORT), and guarded per connection.

Python runs one thread at a time, so one process uses one core; with `[server] reuse_port`
every process started with the same config binds the same ports and the kernel spreads new
connections across them. They share the store (PostgreSQL) and hear each other's changes.

Every listener's factory is wrapped in a GuardFactory: its ConnectionGuard sits between the
socket (or the TLS layer) and the protocol, and enforces the deadlines of the connection
itself (TLS handshake, stalled output, unfinished close) for every protocol alike.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, interfaces, protocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from mailsuite import metrics
from mailsuite.config import LimitsConfig

log = Logger(namespace="mailsuite.listeners")

#: octets a slow client must take per write_stall_timeout for its output not to count as stalled
MIN_PROGRESS = 65536
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked is the u64 at offset 120 (Linux 4.1+).
_TCPI_BYTES_ACKED = 120
_TCP_INFO_SIZE = 128

_TCP_ENDPOINT = re.compile(r"^(tcp6?):(\d+)((?::(?:interface|backlog)=[^:]*)*)$")


def parse_tcp_endpoint(endpoint: str) -> tuple[int, str, int, int] | None:
    """(family, interface, port, backlog) of a plain `tcp:`/`tcp6:` endpoint, else None."""
    match = _TCP_ENDPOINT.match(endpoint.replace("\\:", "\0"))
    if match is None:
        return None
    kind, port, options = match.groups()
    values = dict(part.split("=", 1) for part in options.split(":") if part)
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    interface = values.get("interface", "::" if kind == "tcp6" else "").replace("\0", ":")
    return family, interface, int(port), int(values.get("backlog", 50))


class SharedPortService(service.Service):
    def __init__(self, endpoint: str, factory: protocol.Factory, reactor: Any) -> None:
        parsed = parse_tcp_endpoint(endpoint)
        if parsed is None:
            raise ValueError(f"reuse_port needs a tcp: or tcp6: endpoint, not {endpoint!r}")
        self.family, self.interface, self.port_number, self.backlog = parsed
        self.factory = factory
        self.reactor = reactor
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port_number))
            sock.listen(self.backlog)
            sock.setblocking(False)
            # Twisted duplicates the descriptor; ours is closed below either way.
            self.port = self.reactor.adoptStreamPort(sock.fileno(), self.family, self.factory)
        finally:
            sock.close()

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        if self.port is not None:
            return defer.maybeDeferred(self.port.stopListening)
        return None


def refusal_line(listener: str, hostname: str) -> bytes | None:
    """What a login listener says before hanging up on an address over its failure budget.

    None for listeners that take no logins (the MX).
    """
    kind = listener.rstrip("s")
    if kind == "submission":
        return f"421 4.7.0 {hostname} Too many failed logins, try again later\r\n".encode()
    if kind == "imap":
        return b"* BYE [UNAVAILABLE] too many failed logins from your address\r\n"
    if kind == "pop3":
        return b"-ERR [SYS/TEMP] too many failed logins from your address\r\n"
    return None


@implementer(interfaces.IPushProducer)
class _ProducerWatch:
    """Stands between a protocol's producer and the transport, to see when output stalls.

    A streaming producer is stalled while the transport has it paused; a pull producer while
    the transport asks it for nothing more.
    """

    def __init__(self, guard: ConnectionGuard, producer: Any, streaming: bool) -> None:
        self.guard = guard
        self.producer = producer
        self.streaming = streaming

    def pauseProducing(self) -> None:
        self.guard.stall_timer.start()
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self.streaming:
            self.guard.stall_timer.cancel()
        else:
            self.guard.stall_timer.restart()
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()


class _Deadline:
    """One restartable timer that aborts the guarded connection when it fires.

    A deadline on output (`needs_progress`) is renewed instead while the client keeps
    taking at least MIN_PROGRESS octets of it per period: slow is allowed, stalled is not.
    """

    def __init__(self, guard: ConnectionGuard, seconds: float, what: str,
                 needs_progress: bool = False) -> None:
        self.guard = guard
        self.seconds = seconds
        self.what = what
        self.needs_progress = needs_progress
        self.acked_at_start: int | None = None
        self._call: Any = None

    def start(self) -> None:
        if self._call is None and not self.guard.lost:
            if self.needs_progress:
                self.acked_at_start = self.guard.bytes_acked()
            self._call = self.guard.factory.reactor.callLater(self.seconds, self._fire)

    def restart(self) -> None:
        self.cancel()
        self.start()

    def cancel(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        self.guard.expired(self)


@implementer(interfaces.IHandshakeListener)
class ConnectionGuard(ProtocolWrapper):
    """The transport every listener's protocol sees: deadlines no protocol has to remember.

    - A TLS handshake (implicit TLS, or after startTLS) must finish within handshake_timeout.
      Closing before it has finished aborts at once: the peer could never read a reply,
      and TLS would wait for the handshake before it closes.
    - Output a producer cannot hand over because the client stopped reading, and a close
      that has not completed (unread output, or a TLS peer that never answers close_notify),
      last at most write_stall_timeout, renewed only while the client keeps reading
      (MIN_PROGRESS octets per period).
    Each ends in abortConnection: a polite close would wait on the very client that stalls.
    """

    factory: GuardFactory

    def __init__(self, factory: GuardFactory, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        limits = factory.limits
        self.handshake_timer = _Deadline(self, limits.handshake_timeout, "TLS handshake")
        self.stall_timer = _Deadline(self, limits.write_stall_timeout, "stalled output",
                                     needs_progress=True)
        self.close_timer = _Deadline(self, limits.write_stall_timeout, "unfinished close",
                                     needs_progress=True)
        self.lost = False
        self.peer = ""
        self._handshaking = False
        self._refused = False
        self._producer: _ProducerWatch | None = None

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        peer = transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        if self.factory.implicit_tls:
            self._await_handshake()
        if self.factory.refuses(self.peer):
            # The protocol never starts: no session, no per-address slot, no login.
            self._refused = True
            if self.factory.refusal:
                self.transport.write(self.factory.refusal)
            self.loseConnection()
            return
        self.wrappedProtocol.makeConnection(self)

    def _await_handshake(self) -> None:
        self._handshaking = True
        self.handshake_timer.start()

    def expired(self, deadline: _Deadline) -> None:
        if deadline.needs_progress:
            before, now = deadline.acked_at_start, self.bytes_acked()
            if before is not None and now is not None and now - before >= MIN_PROGRESS:
                deadline.start()
                return
        log.info("aborting connection peer={peer}: {what} exceeded {seconds:g}s",
                 peer=self.peer, what=deadline.what, seconds=deadline.seconds)
        self.abortConnection()

    def bytes_acked(self) -> int | None:
        """Octets of our output the client has acknowledged so far (Linux TCP_INFO), or None.

        This counts what the client really took, below any buffer of ours or of TLS.
        """
        # Under TLS, `socket` is looked up through the TLS layer to the TCP transport.
        sock = getattr(self.transport, "socket", None)
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            return struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)[0]
        except (AttributeError, OSError, struct.error):
            return None

    # --- transport, as the protocol sees it -------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)

    def writeSequence(self, data: Any) -> None:
        if not self.lost:
            self.transport.writeSequence(data)

    def startTLS(self, context: Any, normal: bool = True) -> None:
        self.transport.startTLS(context, normal)
        self._await_handshake()

    def loseConnection(self) -> None:
        if self.disconnecting or self.lost:
            return
        self.disconnecting = 1
        if self._handshaking:
            self.abortConnection()
            return
        self.close_timer.start()
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = 1
        if not self.lost:
            self.transport.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.lost:
            producer.stopProducing()
            return
        self._producer = _ProducerWatch(self, producer, streaming)
        self.transport.registerProducer(self._producer, streaming)
        if not streaming:
            self.stall_timer.start()

    def unregisterProducer(self) -> None:
        # After the connection is gone there is nothing to unregister from (and TLS would
        # fail trying).
        if self._producer is None:
            return
        self._producer = None
        self.stall_timer.cancel()
        if not self.lost:
            self.transport.unregisterProducer()

    # --- events from below --------------------------------------------------------------------
    def handshakeCompleted(self) -> None:
        self._handshaking = False
        self.handshake_timer.cancel()
        if interfaces.IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            self.wrappedProtocol.dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self.lost = True
        self._producer = None
        for timer in (self.handshake_timer, self.stall_timer, self.close_timer):
            timer.cancel()
        if self._refused:
            self.factory.unregisterProtocol(self)
            return
        super().connectionLost(reason)


class GuardFactory(WrappingFactory):
    """Wraps a listener's factory so that each connection gets a ConnectionGuard."""

    protocol = ConnectionGuard

    def __init__(self, wrapped: protocol.Factory, reactor: Any, limits: LimitsConfig,
                 implicit_tls: bool = False,
                 refuses: Callable[[str], bool] | None = None,
                 refusal: bytes | None = None, name: str = "") -> None:
        super().__init__(wrapped)
        self.connections = metrics.CONNECTIONS.labels(name or "unnamed")
        self.reactor = reactor
        self.limits = limits
        self.implicit_tls = implicit_tls
        self._refuses = refuses
        self.refusal = refusal

    def refuses(self, peer: str) -> bool:
        return self._refuses is not None and self._refuses(peer)

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.connections.inc()

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        self.connections.dec()
