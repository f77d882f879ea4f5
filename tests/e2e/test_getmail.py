"""Debian's getmail6 (command `getmail`) against the running POP3 service over pop3s.

getmail6 has no STLS for POP3, so it speaks implicit TLS (SimplePOP3SSLRetriever). It does
not verify certificates unless given ca_certs; we pin the server's self-signed one with
ssl_fingerprints (SHA-256) instead. getmail refuses to deliver into a maildir as root, so
messages go to a maildir in tmp_path through a small MDA (MDA_external, allow_root_commands).
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
from tests.harness import MAILDIR_MDA, Mailsuite, own_server
from tests.pop3.test_pop3_session import PASSWORD, cert_path, make_message, smtp_deliver


@pytest.fixture(scope="module")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """This module's own server instead of the shared one (see own_server)."""
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "getmail")


@pytest.fixture(scope="session")
def getmail_bin() -> str:
    path = shutil.which("getmail")
    if path is None:
        pytest.fail("getmail (Debian package getmail6) is not installed; scripts/test "
                    "installs it (apt-get install getmail6)")
    return path


class Getmail:
    """One getmail configuration (getmaildir with its rc and oldmail files, a maildir)."""

    def __init__(self, binary: str, server: Mailsuite, address: str, workdir: Path,
                 delete: bool) -> None:
        self.binary = binary
        self.workdir = workdir
        self.maildir = workdir / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (self.maildir / sub).mkdir(parents=True)
        mda = workdir / "mda.py"
        mda.write_text(MAILDIR_MDA)
        der = ssl.PEM_cert_to_DER_cert(cert_path(server).read_text())
        self.getmaildir = workdir / "getmail"
        self.getmaildir.mkdir()
        self.rcfile = self.getmaildir / "getmailrc"
        self.rcfile.write_text(
            "[retriever]\n"
            "type = SimplePOP3SSLRetriever\n"
            "server = 127.0.0.1\n"
            f"port = {server.pop3s[1]}\n"
            f"username = {address}\n"
            f"password = {PASSWORD}\n"
            f'ssl_fingerprints = ("{hashlib.sha256(der).hexdigest()}",)\n'
            "\n"
            "[destination]\n"
            "type = MDA_external\n"
            f"path = {sys.executable}\n"
            f'arguments = ("{mda}", "{self.maildir}")\n'
            "allow_root_commands = true\n"
            "\n"
            "[options]\n"
            "verbose = 2\n"
            # read_all = false: only messages whose UIDL getmail has not seen yet
            f"read_all = {'true' if delete else 'false'}\n"
            f"delete = {'true' if delete else 'false'}\n")
        self.rcfile.chmod(0o600)

    def run(self) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, HOME=str(self.workdir))
        return subprocess.run(
            [self.binary, "--getmaildir", str(self.getmaildir), "--rcfile", str(self.rcfile)],
            env=env, capture_output=True, text=True, timeout=120, check=False)

    def delivered(self) -> list[bytes]:
        return [path.read_bytes() for path in sorted((self.maildir / "new").iterdir())]


def retrieved_count(result: subprocess.CompletedProcess[str]) -> int:
    """How many messages getmail says it retrieved in this run."""
    found = re.findall(r"(\d+) messages? \(\d+ bytes\) retrieved", result.stdout)
    assert len(found) == 1, result.stdout + result.stderr
    return int(found[0])


def body_of(raw: bytes) -> bytes:
    """The body with LF line ends (getmail re-writes the header; the body stays)."""
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


def test_getmail_fetches_every_message_and_deletes_it_from_the_server(
        mailsuite: Mailsuite, getmail_bin: str, tmp_path: Path) -> None:
    address = mailsuite.new_account()
    stored = [smtp_deliver(mailsuite, address,
                           make_message(f"fetch {i}", b"line\r\n.dotted\r\n..two\r\n.\r\nend\r\n"))
              for i in range(3)]
    getmail = Getmail(getmail_bin, mailsuite, address, tmp_path, delete=True)
    result = getmail.run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert retrieved_count(result) == 3
    delivered = getmail.delivered()
    assert ids_of(delivered) == ids_of(stored)
    assert sorted(body_of(raw) for raw in delivered) == sorted(body_of(raw) for raw in stored)
    assert mailsuite.inbox(address) == []
    # Run again, as from cron: nothing is left to fetch and nothing fails.
    again = getmail.run()
    assert again.returncode == 0, again.stdout + again.stderr
    assert retrieved_count(again) == 0
    assert len(getmail.delivered()) == 3


def test_getmail_keeping_messages_fetches_only_those_whose_uidl_it_has_not_seen(
        mailsuite: Mailsuite, getmail_bin: str, tmp_path: Path) -> None:
    address = mailsuite.new_account()
    stored = [smtp_deliver(mailsuite, address, make_message(f"keep {i}")) for i in range(2)]
    getmail = Getmail(getmail_bin, mailsuite, address, tmp_path, delete=False)

    first = getmail.run()
    assert first.returncode == 0, first.stdout + first.stderr
    assert retrieved_count(first) == 2
    assert ids_of(getmail.delivered()) == ids_of(stored)
    assert mailsuite.inbox(address) == stored  # kept on the server

    second = getmail.run()
    assert second.returncode == 0, second.stdout + second.stderr
    assert retrieved_count(second) == 0
    assert len(getmail.delivered()) == 2

    newcomer = smtp_deliver(mailsuite, address, make_message("keep newcomer"))
    third = getmail.run()
    assert third.returncode == 0, third.stdout + third.stderr
    assert retrieved_count(third) == 1
    assert ids_of(getmail.delivered()) == ids_of([*stored, newcomer])
    assert mailsuite.inbox(address) == [*stored, newcomer]
