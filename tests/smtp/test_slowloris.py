"""Slow clients are cut off at a deadline, not kept by one byte at a time (issue 9, item 8).

The idle timer is reset by every octet, so it cannot see a client that sends one byte every
few seconds; these deadlines run from a command line's first octet, from the 354 (growing
with the octets received), from the connection (session length), and from the connection
until login (IMAP, POP3). Short deadlines are configured so that each cut is measured.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite, own_server
from tests.smtp.smtp_client import RawSMTP
from tests.smtp.test_mx_data import SENDER

DEADLINE = 2.0
SESSION = 6.0
OVERRIDES = {
    "smtp": {"command_timeout": DEADLINE, "max_session_time": SESSION,
             "min_data_rate": 100_000, "idle_timeout": 30.0},
    "imap": {"login_timeout": DEADLINE * 2, "command_timeout": DEADLINE},
    "pop3": {"login_timeout": DEADLINE * 2, "command_timeout": DEADLINE},
    "auth": {"allow_plaintext": True},
}


@pytest.fixture(scope="module")
def server(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "slowloris", OVERRIDES)


def drip(sock: socket.socket, data: bytes, interval: float, until: float) -> None:
    """Send `data` one octet every `interval` seconds until the server closes or `until`."""
    for byte in data:
        if time.monotonic() > until:
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return  # the server has closed the connection
        readable = _wait_readable(sock, interval)
        if readable:
            return


def _wait_readable(sock: socket.socket, seconds: float) -> bool:
    return bool(select.select([sock], [], [], seconds)[0])


def read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (TimeoutError, ConnectionError):
            return out
        if not chunk:
            return out
        out += chunk


def smtp_session(server: Mailsuite) -> RawSMTP:
    client = RawSMTP(server.mx)
    assert client.greeting()[0] == 220
    assert client.cmd("EHLO client.test")[0] == 250
    return client


# --- SMTP ------------------------------------------------------------------------------------
def test_smtp_command_line_dripped_one_byte_a_second_is_cut_at_the_deadline(
        server: Mailsuite) -> None:
    client = smtp_session(server)
    started = time.monotonic()
    drip(client.sock, b"MAIL FROM:<" + b"a" * 60, 1.0, started + 20)
    code, text = client.reply()
    elapsed = time.monotonic() - started
    assert (code, text[:5]) == (421, "4.4.2"), text
    assert "command line took too long" in text
    assert DEADLINE - 0.2 <= elapsed < DEADLINE + 2.0, elapsed
    assert client.closed()
    client.close()


def test_smtp_each_command_line_gets_its_own_deadline(server: Mailsuite) -> None:
    client = smtp_session(server)
    # Whole commands arriving steadily for longer than one deadline are fine.
    for _ in range(4):
        client.send(b"NO")
        time.sleep(DEADLINE / 4)
        assert client.cmd("OP")[0] == 250
    client.close()


def test_smtp_data_dripped_slowly_is_cut_with_421_and_nothing_stored(
        server: Mailsuite) -> None:
    rcpt = server.new_account()
    client = smtp_session(server)
    assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    started = time.monotonic()
    drip(client.sock, b"Subject: slow\r\n\r\n" + b"x" * 60, 1.0, started + 20)
    code, text = client.reply()
    elapsed = time.monotonic() - started
    assert (code, text[:5]) == (421, "4.4.2"), text
    assert "message data took too long" in text
    # 60 octets at 100000 octets/s buy nothing measurable: cut at the base deadline.
    assert DEADLINE - 0.2 <= elapsed < DEADLINE + 2.0, elapsed
    client.close()
    assert server.inbox(rcpt) == []


def test_smtp_data_deadline_grows_with_the_octets_received(server: Mailsuite) -> None:
    rcpt = server.new_account()
    client = smtp_session(server)
    assert client.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert client.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    started = time.monotonic()
    client.send(b"Subject: steady\r\n\r\n")
    # 100 KB every half second: 4.5 s in all, more than twice the base deadline, but each
    # chunk buys a second at 100000 octets/s.
    for _ in range(10):
        client.send(b"y" * 99_998 + b"\r\n")
        time.sleep(0.5)
    client.send(b".\r\n")
    code, text = client.reply()
    assert time.monotonic() - started > DEADLINE * 2
    assert code == 250, text
    client.close()
    assert len(server.inbox(rcpt)) == 1


def test_smtp_session_longer_than_max_session_time_is_ended(server: Mailsuite) -> None:
    client = RawSMTP(server.mx)
    started = time.monotonic()
    assert client.greeting()[0] == 220
    codes = []
    while time.monotonic() - started < SESSION + 5:
        code, text = client.cmd("EHLO client.test" if not codes else "RSET")
        codes.append(code)
        if code != 250:
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    assert (code, text[:5]) == (421, "4.4.2"), text
    assert "session took too long" in text
    assert SESSION - 0.2 <= elapsed < SESSION + 2.0, elapsed
    client.close()


# --- IMAP and POP3 ---------------------------------------------------------------------------
def test_imap_pre_login_session_gets_bye_at_the_login_deadline(server: Mailsuite) -> None:
    sock = socket.create_connection(server.imap, timeout=10)
    started = time.monotonic()
    assert sock.recv(4096).startswith(b"* OK")
    # Busy with commands, never logging in: the idle timer never fires.
    rest = b""
    while b"BYE" not in rest and time.monotonic() - started < 20:
        sock.sendall(b"a NOOP\r\n")
        time.sleep(0.4)
        rest += sock.recv(65536)
    elapsed = time.monotonic() - started
    rest += read_all(sock)
    assert b"* BYE login took too long" in rest, rest
    assert DEADLINE * 2 - 0.2 <= elapsed < DEADLINE * 2 + 2.0, elapsed
    sock.close()


def test_imap_command_line_dripped_is_cut_with_bye(server: Mailsuite) -> None:
    sock = socket.create_connection(server.imap, timeout=10)
    assert sock.recv(4096).startswith(b"* OK")
    started = time.monotonic()
    drip(sock, b"a LOGIN " + b"u" * 40, 0.7, started + 20)
    elapsed = time.monotonic() - started
    assert b"* BYE command line took too long" in read_all(sock)
    assert DEADLINE - 0.2 <= elapsed < DEADLINE + 2.0, elapsed
    sock.close()


def test_imap_login_deadline_ends_at_login(server: Mailsuite) -> None:
    address = server.new_account()
    sock = socket.create_connection(server.imap, timeout=10)
    sock.recv(4096)
    sock.sendall(f'a LOGIN "{address}" "correct horse"\r\n'.encode())
    assert b"a OK" in sock.recv(4096)
    time.sleep(DEADLINE * 2 + 0.5)
    sock.sendall(b"b NOOP\r\n")
    assert b"b OK" in sock.recv(4096)
    sock.close()


def test_pop3_pre_login_session_gets_err_at_the_login_deadline(server: Mailsuite) -> None:
    sock = socket.create_connection(server.pop3, timeout=10)
    started = time.monotonic()
    assert sock.recv(4096).startswith(b"+OK")
    rest = b""
    while b"took too long" not in rest and time.monotonic() - started < 20:
        sock.sendall(b"NOOP\r\n")
        time.sleep(0.4)
        rest += sock.recv(65536)
    elapsed = time.monotonic() - started
    rest += read_all(sock)
    assert b"-ERR [SYS/TEMP] login took too long" in rest, rest
    assert DEADLINE * 2 - 0.2 <= elapsed < DEADLINE * 2 + 2.0, elapsed
    sock.close()


def test_pop3_login_deadline_ends_at_login_and_command_lines_have_theirs(
        server: Mailsuite) -> None:
    address = server.new_account()
    sock = socket.create_connection(server.pop3, timeout=10)
    sock.recv(4096)
    sock.sendall(f"USER {address}\r\n".encode())
    assert sock.recv(4096).startswith(b"+OK")
    sock.sendall(b"PASS correct horse\r\n")
    assert sock.recv(4096).startswith(b"+OK")
    time.sleep(DEADLINE * 2 + 0.5)
    sock.sendall(b"STAT\r\n")
    assert sock.recv(4096).startswith(b"+OK")
    started = time.monotonic()
    drip(sock, b"RETR 1" + b" " * 40, 0.7, started + 20)
    elapsed = time.monotonic() - started
    assert b"-ERR [SYS/TEMP] command line took too long" in read_all(sock)
    assert DEADLINE - 0.2 <= elapsed < DEADLINE + 2.0, elapsed
    sock.close()
