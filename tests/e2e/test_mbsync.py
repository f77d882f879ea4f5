"""Debian's mbsync (package isync) syncing a whole account both ways over IMAPS.

mbsync trusts exactly the server's self-signed certificate: it is given as a host
certificate in `CertificateFile` (always trusted when it matches the one the server shows)
and the system CAs are off (`SystemCertificates no`), so a different certificate fails.
The near side is a Maildir in tmp_path (`SubFolders Verbatim`), the far side every mailbox
of the account (`Patterns *`), with `Sync All`, `Create Both` and `Expunge Both`.

isync 1.4 (Debian bookworm) calls the option `SSLType`; 1.5 renamed it `TLSType`, so the
spelling follows `mbsync --version`.

A sync is checked from both ends: the Maildir files and the server (imaplib over IMAPS, and
the store). `-Dn` makes mbsync log the IMAP dialogue, which is how a repeated sync is shown
to be a no-op: it only looks (SELECT, UID FETCH of UIDs and FLAGS), never writes.
"""

from __future__ import annotations

import datetime
import imaplib
import os
import re
import secrets
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite

PASSWORD = "correct horse"
SENDER = "a@spf-pass.test"
DEFAULT_MAILBOXES = ["Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"]
# IMAP commands that change something on the server, as mbsync -Dn logs them (">>> 7 APPEND").
WRITES = re.compile(r"^>>> \d+ (UID STORE|STORE|APPEND|EXPUNGE|UID EXPUNGE|CREATE|DELETE"
                    r"|RENAME|MOVE|UID MOVE|COPY|UID COPY)\b", re.MULTILINE)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """This module's own server: a failing test elsewhere cannot use up the shared one's
    IMAP connection slots (mbsync and imaplib each open one per run)."""
    server = Mailsuite(tmp_path_factory.mktemp(f"mbsync-{backend}"), new_db_url(backend),
                       dns_server.address,
                       {"imap": {"max_connections_per_ip": 10_000,
                                 "max_connections_per_account": 10_000}})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mbsync_bin() -> str:
    path = shutil.which("mbsync")
    if path is None:
        pytest.fail("mbsync is not installed; scripts/test installs it (apt-get install isync)")
    return path


@pytest.fixture(scope="session")
def tls_type_option(mbsync_bin: str) -> str:
    """`TLSType` from isync 1.5 on, `SSLType` before."""
    out = subprocess.run([mbsync_bin, "--version"], capture_output=True, text=True,
                         timeout=30, check=False).stdout
    found = re.search(r"(\d+)\.(\d+)", out)
    assert found is not None, out
    return "TLSType" if (int(found[1]), int(found[2])) >= (1, 5) else "SSLType"


def cert_path(server: Mailsuite) -> Path:
    """The self-signed certificate the server generated in its data_dir at first start."""
    return server.workdir / "var" / "tls" / "selfsigned-cert.pem"


# ------------------------------------------------------------------------------- helpers


def make_message(subject: str, body: bytes = b"first line\r\n.dotted line\r\nlast\r\n") -> bytes:
    head = (f"From: Sender <{SENDER}>\r\n"
            "To: <somebody@example.test>\r\n"
            f"Subject: {subject}\r\n"
            f"Message-ID: <{secrets.token_hex(10)}@client.test>\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n").encode()
    return head + b"\r\n" + body


def smtp_deliver(server: Mailsuite, address: str, raw: bytes) -> bytes:
    """Send `raw` to the MX (the 250 comes after the commit); returns the stored bytes."""
    before = len(server.inbox(address))
    with smtplib.SMTP(*server.mx, timeout=30) as smtp:
        assert smtp.sendmail(SENDER, [address], raw) == {}
    stored = server.inbox(address)
    assert len(stored) == before + 1
    return stored[-1]


def normalise(raw: bytes) -> bytes:
    """LF line ends (mbsync stores LF in the Maildir and sends CRLF) and no X-TUID header
    (mbsync adds one to each message it uploads, to find it again)."""
    raw = raw.replace(b"\r\n", b"\n")
    head, sep, body = raw.partition(b"\n\n")
    lines = [line for line in head.split(b"\n") if not line.lower().startswith(b"x-tuid:")]
    return b"\n".join(lines) + sep + body


def message_id(raw: bytes) -> str:
    found = re.findall(rb"(?im)^message-id:[ \t]*(\S+)", raw.replace(b"\r\n", b"\n")
                       .split(b"\n\n", 1)[0])
    assert len(found) == 1, raw[:300]
    return found[0].decode()


def imap_login(server: Mailsuite, address: str) -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=str(cert_path(server)))
    context.check_hostname = False
    client = imaplib.IMAP4_SSL(*server.imaps, ssl_context=context, timeout=30)
    client.login(address, PASSWORD)
    return client


def server_state(server: Mailsuite, address: str) -> dict[str, list[tuple[int, int, str]]]:
    """Every mailbox of the account as (uid, modseq, flags) per message, from the store."""
    account = server.store.account_get(address)
    assert account is not None
    return {box.name: [(m.uid, m.modseq, m.flags)
                       for m in server.store.messages(address, box.name)]
            for box in server.store.mailbox_list(account.id)}


class Mbsync:
    """One mbsync configuration: the account's far side, a Maildir near side."""

    def __init__(self, binary: str, server: Mailsuite, address: str, workdir: Path,
                 tls_type: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.maildir = workdir / "Mail"
        self.maildir.mkdir(parents=True)
        self.rcfile = workdir / "mbsyncrc"
        self.rcfile.write_text(
            "IMAPAccount mailsuite\n"
            "Host 127.0.0.1\n"
            f"Port {server.imaps[1]}\n"
            f"User {address}\n"
            f'Pass "{PASSWORD}"\n'
            f"{tls_type} IMAPS\n"
            f"CertificateFile {cert_path(server)}\n"
            "SystemCertificates no\n"
            "\n"
            "IMAPStore far\n"
            "Account mailsuite\n"
            "\n"
            "MaildirStore near\n"
            f"Path {self.maildir}/\n"
            f"Inbox {self.maildir}/INBOX\n"
            "SubFolders Verbatim\n"
            "\n"
            "Channel account\n"
            "Far :far:\n"
            "Near :near:\n"
            "Patterns *\n"
            "Create Both\n"
            "Expunge Both\n"
            "SyncState *\n"
            "Sync All\n")
        self.rcfile.chmod(0o600)

    def run(self) -> str:
        """One sync of every mailbox; returns mbsync's log, IMAP dialogue included."""
        env = dict(os.environ, HOME=str(self.workdir))
        result = subprocess.run([self.binary, "-Dn", "-c", str(self.rcfile), "-a"],
                                env=env, capture_output=True, text=True, timeout=120,
                                check=False)
        log = result.stdout + result.stderr
        assert result.returncode == 0, log
        # A command the server refused or failed would not stop mbsync from exiting 0.
        assert not re.search(r"^\d+ (NO|BAD) ", log, re.MULTILINE), log
        assert "SERVERBUG" not in log, log
        return log

    def box(self, name: str) -> Path:
        return self.maildir / name

    def files(self, name: str = "INBOX") -> list[Path]:
        box = self.box(name)
        return sorted(p for sub in ("new", "cur") for p in (box / sub).iterdir())

    def snapshot(self) -> dict[str, tuple[str, ...]]:
        """Every message file of every folder, by relative path."""
        folders = [cur.parent for cur in self.maildir.rglob("cur")]
        return {str(folder.relative_to(self.maildir)):
                tuple(sorted(p.name for sub in ("new", "cur") for p in (folder / sub).iterdir()))
                for folder in folders}

    def by_id(self, name: str = "INBOX") -> dict[str, Path]:
        return {message_id(p.read_bytes()): p for p in self.files(name)}

    def add(self, name: str, raw: bytes) -> Path:
        """Deliver into the Maildir as an MUA or MDA does: write in tmp/, rename to new/."""
        filename = f"{secrets.token_hex(8)}.local.mbsync-test"
        tmp = self.box(name) / "tmp" / filename
        tmp.write_bytes(raw)
        return tmp.rename(self.box(name) / "new" / filename)

    @staticmethod
    def set_flags(path: Path, flags: str) -> Path:
        """Rename to `<base>:2,<flags>` in cur/, as a Maildir MUA records flags."""
        base = path.name.split(":2,", 1)[0]
        target = path.parent.parent / "cur" / f"{base}:2,{''.join(sorted(flags))}"
        return path.rename(target)


def flags_of(path: Path) -> str:
    return path.name.split(":2,", 1)[1] if ":2," in path.name else ""


def assert_noop(mbsync: Mbsync, server: Mailsuite, address: str) -> None:
    """Another sync changes nothing on either side and sends no write command."""
    near, far = mbsync.snapshot(), server_state(server, address)
    log = mbsync.run()
    writes = WRITES.findall(log)
    assert writes == [], log
    assert not re.search(r"^>>> \d+ UID FETCH \S+ \(.*BODY", log, re.MULTILINE), log
    assert mbsync.snapshot() == near
    assert server_state(server, address) == far


# --------------------------------------------------------------------------------- tests


def test_mbsync_pulls_the_whole_account_and_a_second_sync_is_a_noop(
        mailsuite: Mailsuite, mbsync_bin: str, tls_type_option: str, tmp_path: Path) -> None:
    address = mailsuite.new_account()
    stored = [smtp_deliver(mailsuite, address, make_message(f"pull {i}")) for i in range(3)]
    # A nested folder with a message in it, made over IMAP, and one in Sent.
    client = imap_login(mailsuite, address)
    try:
        assert client.create("Projects/2026")[0] == "OK"
        filed = make_message("filed away")
        assert client.append("Projects/2026", "(\\Seen)", None, filed)[0] == "OK"
        sent = make_message("sent earlier")
        assert client.append("Sent", "(\\Seen \\Answered)", None, sent)[0] == "OK"
    finally:
        client.logout()

    mbsync = Mbsync(mbsync_bin, mailsuite, address, tmp_path, tls_type_option)
    mbsync.run()

    folders = sorted(str(p.parent.relative_to(mbsync.maildir))
                     for p in mbsync.maildir.rglob("cur"))
    # CREATE made the parent a mailbox of its own too (RFC 3501 6.3.3).
    assert folders == sorted([*DEFAULT_MAILBOXES, "Projects", "Projects/2026"])
    inbox = mbsync.by_id()
    assert sorted(inbox) == sorted(message_id(raw) for raw in stored)
    for raw in stored:
        path = inbox[message_id(raw)]
        assert normalise(path.read_bytes()) == normalise(raw)
        assert flags_of(path) == ""  # unseen on the server, unseen here
    [filed_path] = mbsync.files("Projects/2026")
    assert normalise(filed_path.read_bytes()) == normalise(filed)
    assert flags_of(filed_path) == "S"
    [sent_path] = mbsync.files("Sent")
    assert normalise(sent_path.read_bytes()) == normalise(sent)
    assert flags_of(sent_path) == "RS"  # \Answered is Maildir's R(eplied)
    for empty in ("Archive", "Drafts", "Junk", "Trash", "Projects"):
        assert mbsync.files(empty) == []
    # Nothing the pull did changed the server: it only read (BODY.PEEK, no \Seen).
    assert all(flags == "" for _, _, flags in server_state(mailsuite, address)["INBOX"])

    assert_noop(mbsync, mailsuite, address)


def test_mbsync_pushes_new_local_messages_flags_and_folders(
        mailsuite: Mailsuite, mbsync_bin: str, tls_type_option: str, tmp_path: Path) -> None:
    address = mailsuite.new_account()
    stored = [smtp_deliver(mailsuite, address, make_message(f"push {i}")) for i in range(3)]
    mbsync = Mbsync(mbsync_bin, mailsuite, address, tmp_path, tls_type_option)
    mbsync.run()
    inbox = mbsync.by_id()
    assert len(inbox) == 3

    # Flags set in the Maildir by renaming, a new message in INBOX and in Drafts, a folder.
    first, second = (inbox[message_id(raw)] for raw in stored[:2])
    mbsync.set_flags(first, "S")
    mbsync.set_flags(second, "FS")
    local = make_message("written locally", b"from the near side\r\n")
    mbsync.add("INBOX", local.replace(b"\r\n", b"\n"))
    draft = make_message("a draft", b"not finished\r\n")
    mbsync.set_flags(mbsync.add("Drafts", draft.replace(b"\r\n", b"\n")), "D")
    for sub in ("cur", "new", "tmp"):
        (mbsync.box("Local") / sub).mkdir(parents=True)
    kept = make_message("kept in a local folder")
    mbsync.add("Local", kept.replace(b"\r\n", b"\n"))

    mbsync.run()

    messages = mailsuite.store.messages(address)
    flags = {message_id(m.raw): set(m.flags.split()) for m in messages}
    assert flags == {message_id(stored[0]): {"\\Seen"},
                     message_id(stored[1]): {"\\Seen", "\\Flagged"},
                     message_id(stored[2]): set(),
                     message_id(local): set()}
    [uploaded] = [m for m in messages if message_id(m.raw) == message_id(local)]
    assert normalise(uploaded.raw) == normalise(local)
    assert uploaded.raw.count(b"\r\n") == uploaded.raw.count(b"\n")  # CRLF on the server
    [stored_draft] = mailsuite.store.messages(address, "Drafts")
    assert normalise(stored_draft.raw) == normalise(draft)
    assert stored_draft.flags.split() == ["\\Draft"]
    [stored_kept] = mailsuite.store.messages(address, "Local")
    assert normalise(stored_kept.raw) == normalise(kept)
    # The new local file now carries the UID the server gave it.
    assert re.search(r",U=\d+", mbsync.by_id()[message_id(local)].name)

    # A client on the server sees the same.
    client = imap_login(mailsuite, address)
    try:
        status, data = client.status("Local", "(MESSAGES)")
        assert status == "OK" and b"(MESSAGES 1)" in data[0], data
        client.select("INBOX")
        status, data = client.uid("SEARCH", "FLAGGED")
        assert status == "OK"
        assert [int(n) for n in data[0].split()] == [
            m.uid for m in messages if message_id(m.raw) == message_id(stored[1])]
    finally:
        client.logout()

    assert_noop(mbsync, mailsuite, address)


def test_mbsync_propagates_deletions_and_flag_changes_both_ways(
        mailsuite: Mailsuite, mbsync_bin: str, tls_type_option: str, tmp_path: Path) -> None:
    address = mailsuite.new_account()
    stored = [smtp_deliver(mailsuite, address, make_message(f"delete {i}")) for i in range(5)]
    ids = [message_id(raw) for raw in stored]
    mbsync = Mbsync(mbsync_bin, mailsuite, address, tmp_path, tls_type_option)
    mbsync.run()
    assert sorted(mbsync.by_id()) == sorted(ids)
    uids = {message_id(m.raw): m.uid for m in mailsuite.store.messages(address)}

    # On the server: expunge message 0, flag message 1.
    client = imap_login(mailsuite, address)
    try:
        client.select("INBOX")
        assert client.uid("STORE", str(uids[ids[0]]), "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert client.expunge()[0] == "OK"
        assert client.uid("STORE", str(uids[ids[1]]), "+FLAGS", "(\\Flagged)")[0] == "OK"
    finally:
        client.logout()
    # In the Maildir: trash message 2 (T flag), remove message 3's file outright.
    near = mbsync.by_id()
    mbsync.set_flags(near[ids[2]], "T")
    near[ids[3]].unlink()

    mbsync.run()

    near = mbsync.by_id()
    assert sorted(near) == sorted([ids[1], ids[4]])
    assert flags_of(near[ids[1]]) == "F"
    assert flags_of(near[ids[4]]) == ""
    far = {message_id(m.raw): m.flags for m in mailsuite.store.messages(address)}
    assert far == {ids[1]: "\\Flagged", ids[4]: ""}
    client = imap_login(mailsuite, address)
    try:
        status, data = client.select("INBOX")
        assert status == "OK" and data == [b"2"], data
    finally:
        client.logout()

    assert_noop(mbsync, mailsuite, address)


def test_mbsync_refuses_a_server_whose_certificate_it_was_not_given(
        mailsuite: Mailsuite, mbsync_bin: str, tls_type_option: str, tmp_path: Path) -> None:
    """The pinning above is real: with another self-signed certificate, no sync happens."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other.mailsuite.test")])
    now = datetime.datetime.now(datetime.UTC)
    other = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .sign(key, hashes.SHA256()))
    other_path = tmp_path / "other-cert.pem"
    other_path.write_bytes(other.public_bytes(serialization.Encoding.PEM))

    address = mailsuite.new_account()
    smtp_deliver(mailsuite, address, make_message("never fetched"))
    mbsync = Mbsync(mbsync_bin, mailsuite, address, tmp_path / "sync", tls_type_option)
    mbsync.rcfile.write_text(mbsync.rcfile.read_text().replace(
        f"CertificateFile {cert_path(mailsuite)}\n", f"CertificateFile {other_path}\n"))
    result = subprocess.run([mbsync_bin, "-c", str(mbsync.rcfile), "-a"],
                            env=dict(os.environ, HOME=str(mbsync.workdir)),
                            capture_output=True, text=True, timeout=120, check=False)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log
    assert "certificate" in log.lower(), log
    assert list(mbsync.maildir.rglob("*,U=*")) == []
