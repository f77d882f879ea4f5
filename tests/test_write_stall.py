"""Clients that ask for a large answer and stop reading are dropped once output has stalled
for limits.write_stall_timeout (IMAP FETCH BODY.PEEK[], POP3 RETR, plain and over TLS), and
so are sessions whose close never completes; the server's memory and descriptors stay bounded
and nothing is logged as a traceback."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from mailsuite.store import Delivery
from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite, own_server
from tests.limits_support import (
    FD_SLACK,
    connect_from,
    read_line,
    rss_mb,
    settled_fds,
    still_established,
    tls_client_context,
    traceback_free,
    wait_fds,
)

STALL_TIMEOUT = 2.0
PASSWORD = "correct horse"
MESSAGE_MB = 3
MESSAGES = 4


@pytest.fixture(scope="module")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "write-stall", {
                              "limits": {"write_stall_timeout": STALL_TIMEOUT},
                              "auth": {"allow_plaintext": True},
                              "pop3": {"idle_timeout": 1.0},
                          })


def big_mailbox(server: Mailsuite, messages: int = MESSAGES, size_mb: int = MESSAGE_MB) -> str:
    address = server.new_account(password=PASSWORD)
    account = server.store.account_get(address)
    assert account is not None
    for _ in range(messages):
        body = b"\r\n".join(secrets.token_hex(38).encode()
                            for _ in range(size_mb * 1024 * 1024 // 78))
        raw = (b"From: <a@example.test>\r\nSubject: big\r\nMessage-ID: <"
               + secrets.token_hex(8).encode() + b"@example.test>\r\n\r\n" + body + b"\r\n")
        server.store.deliver(Delivery(raw, (account.id,)))
    return address


def open_stalling(server: Mailsuite, port: str) -> socket.socket:
    """A client with a tiny receive buffer: once it stops reading, the server's output stalls."""
    sock = connect_from(getattr(server, port), rcvbuf=4096)
    if port.endswith("s"):
        sock = tls_client_context(server).wrap_socket(sock)
    return sock


def until(sock: socket.socket, prefix: bytes) -> bytes:
    while True:
        line = read_line(sock)
        assert line, "connection closed"
        if line.startswith(prefix):
            return line


def imap_fetch_and_stall(server: Mailsuite, port: str, address: str) -> socket.socket:
    sock = open_stalling(server, port)
    until(sock, b"* OK")
    sock.sendall(f'a LOGIN "{address}" "{PASSWORD}"\r\n'.encode())
    assert until(sock, b"a ").startswith(b"a OK")
    sock.sendall(b"b SELECT INBOX\r\n")
    assert until(sock, b"b ").startswith(b"b OK")
    sock.sendall(b"c FETCH 1:* BODY.PEEK[]\r\n")
    return sock


def pop3_retr_and_stall(server: Mailsuite, port: str, address: str) -> socket.socket:
    sock = open_stalling(server, port)
    until(sock, b"+OK")
    sock.sendall(f"USER {address}\r\n".encode())
    until(sock, b"+OK")
    sock.sendall(f"PASS {PASSWORD}\r\n".encode())
    assert read_line(sock).startswith(b"+OK")
    sock.sendall(b"RETR 1\r\n")
    return sock


def pop3_login_works(server: Mailsuite, address: str) -> None:
    """The maildrop lock and the per-address slot of the dropped session are released."""
    deadline = time.monotonic() + 5
    while True:
        sock = connect_from(server.pop3)
        read_line(sock)
        sock.sendall(f"USER {address}\r\nPASS {PASSWORD}\r\n".encode())
        read_line(sock)
        reply = read_line(sock)
        sock.close()
        if reply.startswith(b"+OK") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reply.startswith(b"+OK"), reply


@pytest.mark.parametrize("port", ["imap", "imaps", "pop3", "pop3s"])
def test_stalled_reader_is_dropped(mailsuite: Mailsuite, port: str) -> None:
    address = big_mailbox(mailsuite)
    pid = mailsuite.process.pid
    baseline = settled_fds(pid)
    rss_before = rss_mb(pid)
    stall = imap_fetch_and_stall if port.startswith("imap") else pop3_retr_and_stall
    sock = stall(mailsuite, port, address)
    started = time.monotonic()
    peak = rss_before
    # The client reads nothing more; the server must let go of it by itself.
    while still_established(sock) and time.monotonic() - started < 30:
        peak = max(peak, rss_mb(pid))
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    assert not still_established(sock), f"still connected after {elapsed:.1f}s"
    print(f"{port}: dropped {elapsed:.2f}s after the stall began, RSS +{peak - rss_before:.1f} MB")
    assert elapsed < STALL_TIMEOUT + 4, elapsed
    # One chunk of messages (here the whole mailbox) in memory a few times over (rows,
    # rendered answer, TLS records), and nothing more however long the client waits.
    assert peak - rss_before < 6 * MESSAGE_MB * MESSAGES, (rss_before, peak)
    sock.close()
    assert wait_fds(pid, baseline + FD_SLACK, 5) <= baseline + FD_SLACK
    assert "stalled output" in mailsuite.log()
    if port.startswith("pop3"):
        pop3_login_works(mailsuite, address)
    traceback_free(mailsuite)


def test_stalled_tls_reader_that_hangs_up_leaves_no_traceback(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    """The autologout closes a stalled FETCH over TLS (its close waits on the unread output),
    then the client hangs up first: the FETCH, resumed into its next chunk, meets a TLS layer
    that is gone when it cleans up, and must end quietly."""
    server = start_mailsuite({"imap": {"idle_timeout": 1.0},
                              "limits": {"write_stall_timeout": 30.0}})
    address = big_mailbox(server, messages=20, size_mb=1)  # three chunks of 8
    pid = server.process.pid
    baseline = settled_fds(pid)
    sock = imap_fetch_and_stall(server, "imaps", address)
    time.sleep(2.0)
    sock.close()
    assert wait_fds(pid, baseline + FD_SLACK, 5) <= baseline + FD_SLACK
    time.sleep(1.0)  # the FETCH's next chunk is loaded after the connection is gone
    traceback_free(server)


@pytest.mark.parametrize("port", ["imap", "imaps"])
def test_slow_reader_is_not_dropped(mailsuite: Mailsuite, port: str) -> None:
    """Reading on, however slowly, is not a stall: the FETCH completes. Here 9 MB (more than
    the kernel's send buffer takes, so that the server's own buffer stays full for several
    stall periods) at 1 MB/s."""
    address = big_mailbox(mailsuite, messages=3, size_mb=3)
    sock = imap_fetch_and_stall(mailsuite, port, address)
    started = time.monotonic()
    received = b""
    while not received.endswith(b"c OK FETCH completed\r\n"):
        chunk = sock.recv(32768)
        assert chunk, f"dropped after {len(received)} octets"
        received += chunk
        time.sleep(max(0.0, started + len(received) / 1_000_000 - time.monotonic()))
    elapsed = time.monotonic() - started
    print(f"{port}: slow reader took {elapsed:.1f}s for {len(received)} octets")
    assert elapsed > 2 * STALL_TIMEOUT  # it really was slower than one stall period
    assert len(received) > 9 * 1024 * 1024
    sock.close()
    traceback_free(mailsuite)


def test_close_that_never_completes_is_aborted(mailsuite: Mailsuite) -> None:
    """POP3 over TLS autologs out after 1 s; the client never reads, so it never answers the
    server's close_notify, and TLS would wait for that answer forever."""
    address = mailsuite.new_account(password=PASSWORD)
    pid = mailsuite.process.pid
    baseline = settled_fds(pid)
    sock = connect_from(mailsuite.pop3s, rcvbuf=4096)
    tls = tls_client_context(mailsuite).wrap_socket(sock)
    assert read_line(tls).startswith(b"+OK")
    started = time.monotonic()
    while still_established(tls) and time.monotonic() - started < 30:
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    assert not still_established(tls), f"still connected after {elapsed:.1f}s"
    print(f"pop3s close: aborted {elapsed:.2f}s after the greeting")
    assert elapsed < 1.0 + STALL_TIMEOUT + 3, elapsed
    tls.close()
    assert wait_fds(pid, baseline + FD_SLACK, 5) <= baseline + FD_SLACK
    pop3_login_works(mailsuite, address)
    traceback_free(mailsuite)


def test_a_stalled_fetch_of_a_big_mailbox_holds_a_bounded_part_of_it(
        mailsuite: Mailsuite) -> None:
    """FETCH loads whole messages in groups of at most 4 MB (one bigger message alone), so a
    client that stops reading holds a few MB of a 36 MB mailbox, not eight messages' worth."""
    address = big_mailbox(mailsuite, messages=12)
    pid = mailsuite.process.pid
    rss_before = rss_mb(pid)
    sock = imap_fetch_and_stall(mailsuite, "imap", address)
    started = time.monotonic()
    peak = rss_before
    while still_established(sock) and time.monotonic() - started < 30:
        peak = max(peak, rss_mb(pid))
        time.sleep(0.05)
    sock.close()
    print(f"stalled FETCH of 12 x {MESSAGE_MB} MB: RSS +{peak - rss_before:.1f} MB")
    assert peak - rss_before < 25, (rss_before, peak)
    traceback_free(mailsuite)
