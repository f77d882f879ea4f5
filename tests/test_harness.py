"""The test harness itself: a server whose picked port is taken starts again on new ones, and
the failed start's traceback does not stay in the log that tests read."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite


def test_a_taken_port_means_new_ports_and_a_clean_log(
        new_db_url: Callable[[str], str], dns_server: DNSServerHandle, tmp_path: Path) -> None:
    server = Mailsuite(tmp_path / "server", new_db_url("sqlite"), dns_server.address)
    taken = server.ports["imap"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            server.start()
            assert server.ports["imap"] != taken
            assert "Traceback" not in server.log()
            assert "CannotListenError" in (server.workdir / "port-taken.log").read_text()
        finally:
            server.stop()
