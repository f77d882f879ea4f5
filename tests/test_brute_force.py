"""Password guessing from one address costs that address, not everyone: at most
max_logins_in_flight of its logins are checked at once, each waits its penalty before its
password is hashed, and once it is over its failure budget its connections are refused at
the greeting until it has cooled off. Meanwhile other addresses log in fast.

Each test plays its parts from its own loopback addresses (127.0.0.0/8 is all ours), so the
failure counts of one test do not touch another's.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailsuite.passwords import hash_password
from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite, own_server
from tests.limits_support import connect_from, cpu_seconds, read_line, traceback_free

PASSWORD = "correct horse"
MAX_FAILURES = 4
COOL_OFF = 4.0


@pytest.fixture(scope="module")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "brute-force", {
                              "auth": {"allow_plaintext": True, "max_failures": MAX_FAILURES,
                                       "cool_off": COOL_OFF, "max_logins_in_flight": 1},
                          })


class Closed(Exception):
    pass


def imap_connect(server: Mailsuite, source: str) -> tuple[socket.socket, bytes]:
    sock = connect_from(server.imap, source, timeout=30)
    return sock, read_line(sock)


def imap_login(sock: socket.socket, user: str, password: str) -> bool:
    sock.sendall(f'a LOGIN "{user}" "{password}"\r\n'.encode())
    while True:
        line = read_line(sock)
        if not line:
            raise Closed
        if line.startswith(b"a "):
            return line.startswith(b"a OK")


def timed_login(server: Mailsuite, source: str, user: str, password: str) -> tuple[bool, float]:
    """Connect, LOGIN, hang up: (accepted, seconds from connect to the answer)."""
    began = time.perf_counter()
    sock, greeting = imap_connect(server, source)
    try:
        ok = greeting.startswith(b"* OK") and imap_login(sock, user, password)
    finally:
        sock.close()
    return ok, time.perf_counter() - began


def attack(server: Mailsuite, source: str, target: str, stop: float) -> None:
    """One attacking connection: wrong passwords as fast as answered, reconnecting."""
    guess = 0
    while time.monotonic() < stop:
        try:
            sock, greeting = imap_connect(server, source)
        except OSError:
            continue
        try:
            if not greeting.startswith(b"* OK"):
                time.sleep(0.05)
                continue
            while time.monotonic() < stop:
                guess += 1
                imap_login(sock, target, f"guess {guess}")
        except (Closed, OSError):
            pass
        finally:
            sock.close()


def test_other_addresses_stay_fast_while_one_guesses(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    # The attacked account's hash is expensive (cost 12), the victim's cheap: whatever the
    # victim waits for is the attacker's work, not its own.
    target = f"target@{domain}"
    mailsuite.store.account_add(target, hash_password(PASSWORD, rounds=12))
    victim = mailsuite.new_account(domain, PASSWORD)
    pid = mailsuite.process.pid
    duration = 5.0
    cpu_before = cpu_seconds(pid)
    stop = time.monotonic() + duration
    attackers = [threading.Thread(target=attack, args=(mailsuite, "127.0.0.2", target, stop))
                 for _ in range(40)]
    for thread in attackers:
        thread.start()
    time.sleep(0.3)  # the attack is under way
    latencies = []
    while time.monotonic() < stop:
        ok, seconds = timed_login(mailsuite, "127.0.0.3", victim, PASSWORD)
        assert ok
        latencies.append(seconds)
        time.sleep(0.1)
    cpu_used = cpu_seconds(pid) - cpu_before
    for thread in attackers:
        thread.join(30)
    latencies.sort()
    print(f"victim: {len(latencies)} logins, p50 {latencies[len(latencies) // 2]:.3f}s, "
          f"max {latencies[-1]:.3f}s; server CPU {cpu_used:.2f}s in {duration}s")
    assert len(latencies) >= 5
    assert latencies[-1] < 1.0, latencies
    # 40 connections hashed at once would cost 40 x ~0.25 s of CPU; the penalties let
    # through only a few guesses (0 + 0.5 + 1 + 2 s apart) before the address is cut off.
    assert cpu_used < 2.5, cpu_used
    traceback_free(mailsuite)


def greeting(server: Mailsuite, port: str, source: str) -> bytes:
    sock = connect_from(getattr(server, port), source)
    try:
        return read_line(sock)
    finally:
        sock.close()


def test_address_over_its_budget_is_refused_at_the_greeting(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account(password=PASSWORD)
    sock, _ = imap_connect(mailsuite, "127.0.0.5")
    began = time.monotonic()
    with pytest.raises(Closed):  # hung up on after the last failure of the budget
        for attempt in range(MAX_FAILURES + 1):
            assert not imap_login(sock, address, f"wrong {attempt}")
    sock.close()
    # The penalty came before each check: 0 + 0.5 + 1 + 2 s.
    assert time.monotonic() - began >= 3.0
    refused_at = time.monotonic()
    assert greeting(mailsuite, "imap", "127.0.0.5").startswith(b"* BYE [UNAVAILABLE]")
    assert greeting(mailsuite, "pop3", "127.0.0.5").startswith(b"-ERR [SYS/TEMP]")
    assert greeting(mailsuite, "submission", "127.0.0.5").startswith(b"421 4.7.0")
    # Even the right password gets no hearing meanwhile; other addresses, and the MX
    # (which takes no logins), are not affected.
    ok, _ = timed_login(mailsuite, "127.0.0.5", address, PASSWORD)
    assert not ok
    assert greeting(mailsuite, "mx", "127.0.0.5").startswith(b"220")
    assert timed_login(mailsuite, "127.0.0.6", address, PASSWORD)[0]
    # Cooled off: the address is heard again.
    time.sleep(max(0.0, refused_at + COOL_OFF + 0.5 - time.monotonic()))
    assert timed_login(mailsuite, "127.0.0.5", address, PASSWORD)[0]
    traceback_free(mailsuite)


def test_logins_beyond_the_in_flight_cap_wait_their_turn(mailsuite: Mailsuite) -> None:
    """Several clients of one address logging in at once all get in (one at a time)."""
    domain = mailsuite.new_domain()
    accounts = [mailsuite.new_account(domain, PASSWORD) for _ in range(6)]
    with ThreadPoolExecutor(len(accounts)) as pool:
        results = list(pool.map(
            lambda account: timed_login(mailsuite, "127.0.0.7", account, PASSWORD), accounts))
    assert all(ok for ok, _ in results), results
    traceback_free(mailsuite)
