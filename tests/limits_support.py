"""Helpers for the connection-limit tests: raw sockets from chosen loopback addresses, and
the server process's file descriptors and memory as /proc shows them."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from pathlib import Path

from tests.harness import Mailsuite


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def settled_fds(pid: int, timeout: float = 5.0) -> int:
    """The descriptor count once it has stayed the same for half a second (closing client
    connections of a previous step are gone by then)."""
    deadline = time.monotonic() + timeout
    last = fd_count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = fd_count(pid)
        if now == last:
            break
        last = now
    return last


#: descriptors the server may open meanwhile for reasons of its own (a database connection)
FD_SLACK = 2


def wait_fds(pid: int, at_most: int, timeout: float) -> int:
    """Wait until the server holds at most `at_most` descriptors; returns the last count."""
    deadline = time.monotonic() + timeout
    count = fd_count(pid)
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
        count = fd_count(pid)
    return count


def connect_from(address: tuple[str, int], source: str = "127.0.0.1",
                 rcvbuf: int | None = None, timeout: float = 10.0) -> socket.socket:
    """A TCP connection whose client end is bound to `source` (any 127/8 address works)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Before connect, so that the window the server sees is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(address)
    return sock


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Read until the server closes (EOF or reset) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False


def still_established(sock: socket.socket) -> bool:
    """Whether the kernel still has the connection open both ways, without reading from it:
    a reset or a FIN from the server moves it out of ESTABLISHED."""
    state = struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
    return state == 1  # TCP_ESTABLISHED


def tls_client_context(server: Mailsuite) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(server.workdir / "var" / "tls" / "selfsigned-cert.pem"))
    context.check_hostname = False
    return context


def traceback_free(server: Mailsuite) -> None:
    log = server.log()
    assert "Traceback" not in log, log[-4000:]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
