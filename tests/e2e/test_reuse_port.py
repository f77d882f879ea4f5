"""[server] reuse_port: several processes on one machine serve the same ports (one per core)."""

from __future__ import annotations

import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite


@pytest.fixture
def two_processes(new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
                  tmp_path: Path) -> Iterator[list[Mailsuite]]:
    url = new_db_url("postgresql")
    overrides = {"server": {"reuse_port": True}}
    first = Mailsuite(tmp_path / "one", url, dns_server.address, overrides).start()
    second = Mailsuite(tmp_path / "two", url, dns_server.address, overrides,
                       ports=first.ports)
    try:
        second.start()
        yield [first, second]
    finally:
        second.stop()
        first.stop()


def test_two_processes_share_the_mx_port_and_both_take_connections(
        two_processes: list[Mailsuite]) -> None:
    first, second = two_processes
    address = first.new_account()
    for number in range(40):  # the kernel spreads new connections by a hash of the peer
        with smtplib.SMTP(*first.mx) as smtp:
            smtp.sendmail("a@spf-pass.test", [address], f"Subject: {number}\r\n\r\nx\r\n".encode())
    assert len(first.inbox(address)) == 40
    served = [server.log().count("smtp session esmtp") for server in two_processes]
    assert sum(served) == 40 and all(count > 0 for count in served), served


def test_reuse_port_refuses_endpoints_it_cannot_share(tmp_path: Path,
                                                      dns_server: DNSServerHandle) -> None:
    server = Mailsuite(tmp_path / "bad", f"sqlite:///{tmp_path / 'db.sqlite'}",
                       dns_server.address, {"server": {"reuse_port": True},
                                            "listen": {"imaps": "ssl:0"}})
    with pytest.raises(RuntimeError, match=r"listen\.imaps.*tcp: or tcp6:"):
        server.start()
