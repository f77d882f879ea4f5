"""Listening sockets shared by several mailsuite processes on one machine (SO_REUSEPORT).

Python runs one thread at a time, so one process uses one core; with `[server] reuse_port`
every process started with the same config binds the same ports and the kernel spreads new
connections across them. They share the store (PostgreSQL) and hear each other's changes.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol

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
