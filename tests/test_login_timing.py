"""An unknown user costs as much as a known one with a wrong password: the hash checked in
its place is made at the configured bcrypt cost, so timing does not tell accounts apart."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import pytest

from mailsuite.passwords import check_password, dummy_hash, hash_password
from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite, own_server
from tests.limits_support import connect_from, read_line

ROUNDS = 10  # not 12: the cost the dummy hash used to have whatever the configuration
PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "login-timing", {"auth": {"allow_plaintext": True,
                                                    "bcrypt_rounds": ROUNDS}})


def test_dummy_hash_has_the_configured_cost() -> None:
    for rounds in (4, ROUNDS):
        assert dummy_hash(rounds).startswith(f"$2b${rounds:02d}$")


def failed_login_seconds(server: Mailsuite, source: str, user: str) -> float:
    """One wrong LOGIN from a fresh address (no penalty of earlier failures applies)."""
    sock = connect_from(server.imap, source)
    try:
        assert read_line(sock).startswith(b"* OK")
        began = time.perf_counter()
        sock.sendall(f'a LOGIN "{user}" "wrong password"\r\n'.encode())
        line = read_line(sock)
        elapsed = time.perf_counter() - began
        assert line.startswith(b"a NO [AUTHENTICATIONFAILED]"), line
        return elapsed
    finally:
        sock.close()


def test_unknown_and_known_users_take_as_long(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    known = f"known@{domain}"
    mailsuite.store.account_add(known, hash_password(PASSWORD, rounds=ROUNDS))
    unknown = f"nobody@{domain}"
    failed_login_seconds(mailsuite, "127.0.1.250", unknown)  # the dummy hash is made once
    times: dict[str, list[float]] = {known: [], unknown: []}
    for n in range(12):  # interleaved, so that both see the same load on this machine
        for user in (known, unknown):
            source = f"127.0.1.{2 * n + (user == unknown) + 1}"
            times[user].append(failed_login_seconds(mailsuite, source, user))
    known_median = statistics.median(times[known])
    unknown_median = statistics.median(times[unknown])
    print(f"known user, wrong password: {known_median * 1000:.0f} ms; "
          f"unknown user: {unknown_median * 1000:.0f} ms")
    # What one check at this cost takes on this machine now; a cost-12 dummy would add 3x.
    began = time.perf_counter()
    check_password("wrong password", hash_password(PASSWORD, rounds=ROUNDS))
    one_check = (time.perf_counter() - began) / 2
    assert abs(unknown_median - known_median) < 0.5 * one_check + 0.02, (one_check, times)
