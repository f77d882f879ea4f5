"""TLS handshakes have a deadline: connections to the implicit-TLS ports, or after STARTTLS,
that never finish their handshake are aborted, also those already refused by a per-address
cap, and the per-address counts and the server's descriptors return to where they were."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite, own_server
from tests.limits_support import (
    FD_SLACK,
    closed_by_server,
    connect_from,
    fd_count,
    read_line,
    settled_fds,
    tls_client_context,
    traceback_free,
    wait_fds,
)

HANDSHAKE_TIMEOUT = 1.5
CAP = 4  # connections per address on each protocol
PASSWORD = "correct horse"
IMPLICIT = ("submissions", "imaps", "pop3s")


@pytest.fixture(scope="module")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "handshake", {
                              "limits": {"handshake_timeout": HANDSHAKE_TIMEOUT},
                              "smtp": {"max_connections_per_ip": CAP},
                              "imap": {"max_connections_per_ip": CAP},
                              "pop3": {"max_connections_per_ip": CAP},
                          })


def normal_logins(server: Mailsuite, addresses: list[str]) -> None:
    """CAP clients at once on every implicit-TLS port log in: no per-address slot leaked."""
    context = tls_client_context(server)

    def pop3(address: str) -> None:
        client = poplib.POP3_SSL(*server.pop3s, timeout=10, context=context)
        client.user(address)  # one account each: a maildrop takes one session
        assert client.pass_(PASSWORD).startswith(b"+OK")
        client.quit()

    def imap(address: str) -> None:
        client = imaplib.IMAP4_SSL(*server.imaps, ssl_context=context, timeout=10)
        assert client.login(address, PASSWORD)[0] == "OK"
        client.logout()

    def smtp(address: str) -> None:
        with smtplib.SMTP_SSL(*server.submissions, context=context, timeout=10) as client:
            client.login(address, PASSWORD)

    with ThreadPoolExecutor(CAP) as pool:
        for check in (pop3, imap, smtp):
            list(pool.map(check, addresses))


def test_silent_implicit_tls_connections_are_aborted(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    address = [mailsuite.new_account(domain, PASSWORD) for _ in range(CAP)]
    pid = mailsuite.process.pid
    normal_logins(mailsuite, address)  # certificate made, threads started: a fair baseline
    baseline = settled_fds(pid)
    per_port = CAP + 4  # the last 4 on each port are over the cap, refused before the handshake
    socks = {name: [connect_from(getattr(mailsuite, name)) for _ in range(per_port)]
             for name in IMPLICIT}
    started = time.monotonic()
    # The server holds the ones within the cap (the others are gone at once).
    while fd_count(pid) < baseline + len(IMPLICIT) * CAP and time.monotonic() - started < 1:
        time.sleep(0.02)
    assert fd_count(pid) >= baseline + len(IMPLICIT) * CAP

    def watch(sock: socket.socket) -> float | None:
        return time.monotonic() - started if closed_by_server(sock, HANDSHAKE_TIMEOUT + 5) \
            else None

    with ThreadPoolExecutor(len(IMPLICIT) * per_port) as pool:
        futures = {name: [pool.submit(watch, sock) for sock in socks[name]]
                   for name in IMPLICIT}
        closed_after = {name: [f.result() for f in group] for name, group in futures.items()}
    for name, times in closed_after.items():
        assert None not in times, (name, times)
        print(f"{name}: closed after " + " ".join(f"{t:.2f}" for t in sorted(times)) + " s")
        # Refused at once: aborted long before the handshake deadline.
        assert sorted(times)[per_port - CAP - 1] < HANDSHAKE_TIMEOUT / 2, (name, times)
        # The rest when the deadline passed, not earlier.
        assert max(times) >= HANDSHAKE_TIMEOUT * 0.9, (name, times)
        assert max(times) < HANDSHAKE_TIMEOUT + 3, (name, times)
    for sock in (s for group in socks.values() for s in group):
        sock.close()
    print(f"server fds: baseline {baseline}, after {wait_fds(pid, baseline + FD_SLACK, 5)}")
    assert wait_fds(pid, baseline + FD_SLACK, 5) <= baseline + FD_SLACK
    normal_logins(mailsuite, address)
    traceback_free(mailsuite)


def starttls_then_silence(server: Mailsuite, protocol: str) -> socket.socket:
    """A plain connection that asks for TLS, is told to go ahead, and never sends a byte."""
    sock = connect_from(getattr(server, protocol))
    greeting = read_line(sock)
    if protocol == "pop3":
        assert greeting.startswith(b"+OK"), greeting
        sock.sendall(b"STLS\r\n")
        assert read_line(sock).startswith(b"+OK")
    elif protocol == "imap":
        assert greeting.startswith(b"* OK"), greeting
        sock.sendall(b"a STARTTLS\r\n")
        assert read_line(sock).startswith(b"a OK")
    else:
        assert greeting.startswith(b"220"), greeting
        sock.sendall(b"EHLO client.test\r\n")
        while not read_line(sock).startswith(b"250 "):
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert read_line(sock).startswith(b"220")
    return sock


def test_silence_after_starttls_is_aborted(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    address = [mailsuite.new_account(domain, PASSWORD) for _ in range(CAP)]
    pid = mailsuite.process.pid
    normal_logins(mailsuite, address)
    baseline = settled_fds(pid)
    socks = [starttls_then_silence(mailsuite, protocol)
             for protocol in ("pop3", "imap", "submission") for _ in range(CAP)]
    started = time.monotonic()
    with ThreadPoolExecutor(len(socks)) as pool:
        closed = list(pool.map(lambda s: closed_by_server(s, HANDSHAKE_TIMEOUT + 5), socks))
    elapsed = time.monotonic() - started
    assert all(closed), closed
    print(f"after STARTTLS: {len(socks)} silent connections closed within {elapsed:.2f} s")
    assert elapsed < HANDSHAKE_TIMEOUT + 3
    for sock in socks:
        sock.close()
    assert wait_fds(pid, baseline + FD_SLACK, 5) <= baseline + FD_SLACK
    # Every per-address slot came back: the plain ports take CAP sessions again.
    again = [starttls_then_silence(mailsuite, protocol)
             for protocol in ("pop3", "imap", "submission") for _ in range(CAP)]
    for sock in again:
        sock.close()
    traceback_free(mailsuite)
