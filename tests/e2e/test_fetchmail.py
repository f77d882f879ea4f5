"""Debian's fetchmail against the running POP3 service, over STLS and over pop3s.

fetchmail checks nothing we do not pin: the self-signed certificate is not verified
(`no sslcertck`), but its MD5 fingerprint must match (`sslfingerprint`), and TLS is required
(`sslproto tls1.2+` makes STLS mandatory on the pop3 port). Messages go to a maildir in
tmp_path through a small MDA, never through a local SMTP server.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DNSServerHandle
from tests.harness import MAILDIR_MDA, TEST_HOSTNAME, Mailsuite, own_server
from tests.pop3.test_pop3_session import (
    PASSWORD,
    cert_path,
    make_message,
    smtp_deliver,
)

# fetchmail's exit status (fetchmail(1), "EXIT CODES")
RETRIEVED = 0
NO_MAIL = 1



@pytest.fixture(scope="module")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """This module's own server instead of the shared one (see own_server)."""
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "fetchmail")


@pytest.fixture(scope="session")
def fetchmail_bin() -> str:
    path = shutil.which("fetchmail")
    if path is None:
        pytest.fail("fetchmail is not installed; scripts/test installs it "
                    "(apt-get install fetchmail)")
    return path


class Fetchmail:
    """One fetchmail configuration (rcfile, UIDL file, maildir) in a private directory."""

    def __init__(self, binary: str, server: Mailsuite, address: str, workdir: Path,
                 via: str, keep: bool) -> None:
        self.binary = binary
        self.server = server
        self.workdir = workdir
        self.maildir = workdir / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (self.maildir / sub).mkdir(parents=True)
        mda = workdir / "mda.py"
        mda.write_text(MAILDIR_MDA)
        der = ssl.PEM_cert_to_DER_cert(cert_path(server).read_text())
        md5 = hashlib.md5(der).hexdigest().upper()
        fingerprint = ":".join(md5[i:i + 2] for i in range(0, len(md5), 2))
        port = server.pop3s[1] if via == "pop3s" else server.pop3[1]
        self.rcfile = workdir / "fetchmailrc"
        self.rcfile.write_text(
            "set no syslog\n"
            f"poll 127.0.0.1 with proto POP3 port {port} uidl\n"
            f'  user "{address}" there with password "{PASSWORD}"\n'
            f"  {'ssl ' if via == 'pop3s' else ''}sslproto \"tls1.2+\" "
            f'sslfingerprint "{fingerprint}" no sslcertck sslcommonname "{TEST_HOSTNAME}"\n'
            f'  mda "{sys.executable} {mda} {self.maildir}"\n'
            f"  {'keep' if keep else 'no keep fetchall'}\n")
        self.rcfile.chmod(0o600)

    def run(self) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, HOME=str(self.workdir), FETCHMAILHOME=str(self.workdir))
        return subprocess.run(
            [self.binary, "--fetchmailrc", str(self.rcfile), "--idfile",
             str(self.workdir / "fetchids"), "--pidfile", str(self.workdir / "fetchmail.pid"),
             "--verbose", "--nodetach"],
            env=env, capture_output=True, text=True, timeout=120, check=False)

    def delivered(self) -> list[bytes]:
        return [path.read_bytes() for path in sorted((self.maildir / "new").iterdir())]


def body_of(raw: bytes) -> bytes:
    """The body with LF line ends (fetchmail hands the MDA LF lines)."""
    return raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]


def ids_of(messages: list[bytes]) -> list[str]:
    """The Message-IDs, sorted; CRLF or LF line ends alike."""
    ids = []
    for raw in messages:
        head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
        found = re.findall(rb"(?im)^message-id:[ \t]*(\S+)", head)
        assert len(found) == 1, head
        ids.append(found[0].decode())
    return sorted(ids)


@pytest.mark.parametrize("via", ["stls", "pop3s"])
def test_fetchmail_fetches_every_message_and_deletes_it_from_the_server(
        mailsuite: Mailsuite, fetchmail_bin: str, tmp_path: Path,
        via: str) -> None:
    address = mailsuite.new_account()
    stored = [smtp_deliver(mailsuite, address,
                           make_message(f"fetch {i}", b"line\r\n.dotted\r\n..two\r\nend\r\n"))
              for i in range(3)]
    fetchmail = Fetchmail(fetchmail_bin, mailsuite, address, tmp_path, via, keep=False)
    result = fetchmail.run()
    log = result.stdout + result.stderr
    assert result.returncode == RETRIEVED, log
    assert "fingerprints match" in log, log  # TLS with the server's own certificate
    if via == "stls":
        assert "POP3> STLS" in log and "upgrade to TLS succeeded" in log, log
    delivered = fetchmail.delivered()
    assert ids_of(delivered) == ids_of(stored)
    assert sorted(body_of(raw) for raw in delivered) == sorted(body_of(raw) for raw in stored)
    assert mailsuite.inbox(address) == []
    # Run again, as from cron: nothing is left to fetch and nothing fails.
    again = fetchmail.run()
    assert again.returncode == NO_MAIL, again.stdout + again.stderr
    assert len(fetchmail.delivered()) == 3


@pytest.mark.parametrize("via", ["stls", "pop3s"])
def test_fetchmail_keep_with_uidl_fetches_only_messages_it_has_not_seen(
        mailsuite: Mailsuite, fetchmail_bin: str, tmp_path: Path, via: str) -> None:
    address = mailsuite.new_account()
    stored = [smtp_deliver(mailsuite, address, make_message(f"keep {i}")) for i in range(2)]
    fetchmail = Fetchmail(fetchmail_bin, mailsuite, address, tmp_path, via, keep=True)

    first = fetchmail.run()
    assert first.returncode == RETRIEVED, first.stdout + first.stderr
    assert ids_of(fetchmail.delivered()) == ids_of(stored)
    assert mailsuite.inbox(address) == stored  # kept on the server

    second = fetchmail.run()
    assert second.returncode == NO_MAIL, second.stdout + second.stderr
    assert len(fetchmail.delivered()) == 2

    newcomer = smtp_deliver(mailsuite, address, make_message("keep newcomer"))
    third = fetchmail.run()
    assert third.returncode == RETRIEVED, third.stdout + third.stderr
    delivered = fetchmail.delivered()
    assert len(delivered) == 3
    assert ids_of(delivered) == ids_of([*stored, newcomer])
    assert mailsuite.inbox(address) == [*stored, newcomer]
