"""A line protocol that answers one command before it reads the next.

SMTP and POP3 clients may pipeline (RFC 2920, RFC 2449): several commands arrive in one
packet, and the replies must come back in order even when a command waits on the database.
While a command's Deferred is pending, input stays buffered and the transport is paused, so
a client that floods us is held back by TCP instead of by our memory (reading pauses once
more than PAUSE_AT octets wait; below that, pausing for every command would cost two epoll
calls per command for nothing).

Time is bounded two ways. The idle timer (TimeoutMixin) measures the client's silence only:
it is paused while a command is being worked on and restarted once the reply is written, so
a slow database never makes the server hang up on a client that is waiting for it. Named
deadlines bound what a slow client can hold: a command line must be complete within
command_deadline seconds of its first octet (one byte every few seconds keeps an idle timer
happy forever), and subclasses set others with set_deadline() (a session or login length,
a DATA phase). A deadline that passes while a command is being processed waits for its
reply, so it never cuts off an answer the client is owed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

log = Logger(namespace="mailsuite.lineproto")


class SerialLineProtocol(protocol.Protocol, TimeoutMixin):
    """Subclasses implement line_received(); it may return a Deferred to hold the input."""

    #: longest line accepted, counting its CRLF
    max_line = 1000
    #: buffered input that makes us stop reading while a command is pending
    PAUSE_AT = 65536
    #: seconds from a command line's first octet to its end (None: no limit)
    command_deadline: float | None = None

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._discarding_line = False
        self._busy = False
        self._paused = False
        self._processing = False
        self._lost = False
        self._closing = False
        self._idle_period: float | None = None
        self._deadlines: dict[str, Any] = {}
        self._overdue: list[str] = []

    # --- for subclasses ------------------------------------------------------------------
    def line_received(self, line: bytes) -> defer.Deferred | None:
        raise NotImplementedError

    def line_too_long(self) -> None:
        """A line exceeded max_line; the rest of it will be skipped."""
        raise NotImplementedError

    def consume_raw(self) -> bool | None:
        """Called instead of line splitting while raw_mode() is true.

        Take what you need from self._buffer; return True to go on processing, anything
        else to wait for more input.
        """
        raise NotImplementedError

    def raw_mode(self) -> bool:
        return False

    def deadline_exceeded(self, name: str) -> None:
        """Deadline `name` passed: write the protocol's goodbye; the connection is then closed."""
        raise NotImplementedError

    def set_deadline(self, name: str, seconds: float | None) -> None:
        """Call deadline_exceeded(name) in `seconds` (moving it if set; None cancels it)."""
        call = self._deadlines.pop(name, None)
        if name in self._overdue:
            self._overdue.remove(name)
        if seconds is None or self._lost:
            if call is not None and call.active():
                call.cancel()
            return
        if call is not None and call.active():
            call.reset(max(seconds, 0.0))
        else:
            call = self.callLater(max(seconds, 0.0), lambda: self._deadline_passed(name))
        self._deadlines[name] = call

    def hold(self, d: defer.Deferred) -> None:
        """Process no further input until `d` has fired (its result is ignored)."""
        self._busy = True
        # The client is waiting on us now: its silence is not idleness.
        self._idle_period = self.setTimeout(None)
        self._pause_if_flooded()
        d.addErrback(lambda failure: log.failure("command failed", failure=failure))
        d.addBoth(self._release)

    def close(self) -> None:
        self._closing = True
        # Reading may be paused by hold(); TLS needs to read the peer's close_notify before
        # the connection is really gone (and its per-IP slot given back).
        self.transport.resumeProducing()
        self.transport.loseConnection()

    def discard_input(self) -> None:
        """Forget buffered input (after STARTTLS/STLS: plaintext must not cross into TLS)."""
        self._buffer.clear()

    @property
    def gone(self) -> bool:
        return self._lost or self._closing

    # --- machinery -----------------------------------------------------------------------
    def makeConnection(self, transport: Any) -> None:
        # Replies are small writes answered by the client; Nagle plus delayed ACKs would add
        # tens of milliseconds to each (most visibly under TLS).
        tcp = getattr(transport, "transport", transport)
        if hasattr(tcp, "setTcpNoDelay"):
            tcp.setTcpNoDelay(True)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self._buffer += data
        if self._busy:
            self._pause_if_flooded()
        self._process()

    def _pause_if_flooded(self) -> None:
        if not self._paused and len(self._buffer) > self.PAUSE_AT:
            self._paused = True
            self.transport.pauseProducing()

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        self.setTimeout(None)
        for call in self._deadlines.values():
            if call.active():
                call.cancel()
        self._deadlines.clear()

    def _deadline_passed(self, name: str) -> None:
        self._deadlines.pop(name, None)
        if self.gone:
            return
        if self._busy:
            self._overdue.append(name)  # answer the command first
            return
        self.deadline_exceeded(name)
        if not self.gone:
            self.close()

    def _release(self, _: Any) -> None:
        self._busy = False
        if self.gone:
            return
        if self._overdue:
            self._deadline_passed(self._overdue.pop(0))
            return
        if self._idle_period is not None:
            self.setTimeout(self._idle_period)  # the reply is written: silence counts again
            self._idle_period = None
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._process()

    def _watch_command_line(self) -> None:
        """Run the command deadline while part of a line waits for the rest of it."""
        waiting = ((self._buffer or self._discarding_line) and not self._busy
                   and not self.gone and not self.raw_mode())
        if waiting and self.command_deadline is not None:
            if "command" not in self._deadlines:
                self.set_deadline("command", self.command_deadline)
        elif "command" in self._deadlines:
            self.set_deadline("command", None)

    def _process(self) -> None:
        if self._processing:
            return  # a command finished synchronously inside the loop below; it carries on
        self._processing = True
        try:
            while self._buffer and not self._busy and not self.gone:
                if self.raw_mode():
                    if self.consume_raw() is not True:
                        return
                    continue
                end = self._buffer.find(b"\n")
                if end < 0:
                    if len(self._buffer) > self.max_line:
                        self._buffer.clear()
                        if not self._discarding_line:
                            self._discarding_line = True
                            self.line_too_long()
                    return
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self.set_deadline("command", None)  # the next line's time starts afresh
                if self._discarding_line:
                    self._discarding_line = False
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) + 2 > self.max_line:
                    self.line_too_long()
                    continue
                result = self.line_received(line)
                if isinstance(result, defer.Deferred):
                    self.hold(result)
        finally:
            self._processing = False
            self._watch_command_line()
