"""twistd in daemon mode, as operators run it: the store is opened by the daemon, not by the
parent that forks it and exits, so accounts added with the CLI meanwhile work at once and the
SQLite file stays whole."""

from __future__ import annotations

import imaplib
import os
import smtplib
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite

MAILSUITE = str(Path(sys.executable).parent / "mailsuite")
PASSWORD = "a long passphrase"


@pytest.fixture
def daemon(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
           tmp_path: Path) -> Iterator[Mailsuite]:
    server = Mailsuite(tmp_path / "daemon", new_db_url(backend), dns_server.address,
                       {"auth": {"allow_plaintext": True}}, daemon=True)
    try:
        yield server.start()
    finally:
        server.stop()


def cli(server: Mailsuite, *args: str, stdin: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSUITE_")}
    done = subprocess.run([MAILSUITE, "--config", str(server.config_path), *args],
                          input=stdin, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def held_files(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    return [os.readlink(fd) for fd in fds.iterdir() if fd.exists()]


def posix_lock_holders() -> set[int]:
    """Pids holding POSIX (fcntl) locks, from /proc/locks."""
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "POSIX" in fields and len(fields) > 4 and fields[4].isdigit():
            pids.add(int(fields[4]))
    return pids


def process_start(pid: int) -> datetime:
    """When a process started, from /proc (clock ticks after boot)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), UTC)


def pg_sessions_started(db_url: str) -> list[datetime]:
    """backend_start of every session on this test database but our own."""
    import psycopg2

    url = make_url(db_url)
    conn = psycopg2.connect(url.set(drivername="postgresql").render_as_string(False))
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT backend_start FROM pg_stat_activity"
                           " WHERE datname = %s AND pid <> pg_backend_pid()", (url.database,))
            return [row[0] for row in cursor.fetchall()]
    finally:
        conn.close()


def test_daemon_serves_accounts_added_by_the_cli_while_it_runs_and_leaves_a_whole_store(
        daemon: Mailsuite, backend: str) -> None:
    assert daemon.pid is not None and daemon.pidfile.exists()
    assert int(daemon.pidfile.read_text()) == daemon.pid

    cli(daemon, "domain", "add", "daemon.test")
    cli(daemon, "user", "add", "alice@daemon.test", "--password-stdin", stdin=PASSWORD + "\n")
    cli(daemon, "alias", "add", "sales@daemon.test", "alice@daemon.test")

    with smtplib.SMTP(*daemon.mx, timeout=30) as smtp:
        for recipient, subject in (("alice@daemon.test", "direct"),
                                   ("sales@daemon.test", "via-alias")):
            refused = smtp.sendmail("someone@spf-pass.test", [recipient],
                                    f"Subject: {subject}\r\n\r\nhello\r\n".encode())
            assert refused == {}

    imap = imaplib.IMAP4(*daemon.imap)
    imap.login("alice@daemon.test", PASSWORD)
    status, data = imap.select("INBOX")
    assert status == "OK" and data == [b"2"]
    status, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = sorted(part[1].strip() for part in data if isinstance(part, tuple))
    assert subjects == [b"Subject: direct", b"Subject: via-alias"]
    imap.logout()

    # The daemon opened the store itself: nothing of a forked-away parent is held.
    files = held_files(daemon.pid)
    assert not [f for f in files if f.endswith("(deleted)")], files
    if backend == "sqlite":
        db_path = make_url(daemon.db_url).database
        assert any(f == db_path for f in files), files
        assert daemon.pid in posix_lock_holders()
    else:
        # No connection inherited across the fork: each began after the daemon did (the
        # clock-tick start time is coarse, so allow a tick).
        started = process_start(daemon.pid) - timedelta(seconds=0.05)
        sessions = pg_sessions_started(daemon.db_url)
        assert sessions and all(s >= started for s in sessions), (started, sessions)

    pid = daemon.pid
    daemon.stop()  # SIGTERM to the pid in the pidfile
    assert not Path(f"/proc/{pid}").exists()
    assert not daemon.pidfile.exists(), "a clean stop removes the pidfile"
    if backend == "sqlite":
        with sqlite3.connect(make_url(daemon.db_url).database) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert sorted(m.raw.split(b"\r\n\r\n")[0].split(b"Subject: ")[-1]
                  for m in daemon.store.messages("alice@daemon.test")) == [b"direct",
                                                                         b"via-alias"]


def test_daemon_restarted_from_its_pidfile_still_has_the_mail(daemon: Mailsuite) -> None:
    address = daemon.new_account()
    with smtplib.SMTP(*daemon.mx, timeout=30) as smtp:
        smtp.sendmail("someone@spf-pass.test", [address], b"Subject: kept\r\n\r\nkept\r\n")
    daemon.stop()
    daemon.start()
    imap = imaplib.IMAP4(*daemon.imap)
    imap.login(address, "correct horse")
    status, data = imap.select("INBOX")
    assert status == "OK" and data == [b"1"]
    imap.logout()
