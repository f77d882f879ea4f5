"""Start the real mailsuite service (`twistd -n mailsuite`) on free loopback ports for tests."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mailsuite.passwords import hash_password
from mailsuite.store import Store, open_store

REPO = Path(__file__).resolve().parent.parent
TEST_HOSTNAME = "mx.mailsuite.test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


class Mailsuite:
    """One mailsuite process with its own config, data dir and ports."""

    def __init__(self, workdir: Path, db_url: str, dns_address: str,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 ports: dict[str, int] | None = None, daemon: bool = False) -> None:
        self.workdir = workdir
        #: run as operators do: twistd forks into the background and writes a pidfile
        self.daemon = daemon
        self.pidfile = workdir / "twistd.pid"
        self.db_url = db_url
        workdir.mkdir(parents=True, exist_ok=True)
        # Ports picked here are free now but may be taken before the server binds them (other
        # test servers, sinks, benchmarks on this machine): start() then picks new ones.
        self._own_ports = not ports
        self.ports = dict(ports) if ports else self._free_ports()
        self._dns_address = dns_address
        self._overrides = overrides or {}
        self.config_path = workdir / "mailsuite.toml"
        self._write_config()
        self.log_path = workdir / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None
        #: the server's pid (in daemon mode not the Popen's, which is the parent that exits)
        self.pid: int | None = None
        self._store: Store | None = None

    @staticmethod
    def _free_ports() -> dict[str, int]:
        return {name: free_port() for name in ("mx", "pop3", "pop3s", "imap", "imaps",
                                               "submission", "submissions", "http")}

    def _write_config(self) -> None:
        sections: dict[str, dict[str, Any]] = {
            "server": {"hostname": TEST_HOSTNAME, "data_dir": str(self.workdir / "var")},
            "database": {"url": self.db_url, "pool_size": 4},
            "listen": {name: f"tcp:{port}:interface=127.0.0.1"
                       for name, port in self.ports.items()},
            "dns": {"resolver": self._dns_address, "timeout": 1.0},
            "smtp": {"greeting_delay": 0.05},
            "auth": {"bcrypt_rounds": 4},
        }
        for section, values in self._overrides.items():
            sections.setdefault(section, {}).update(values)
        write_config(self.config_path, sections)

    @property
    def mx(self) -> tuple[str, int]:
        return ("127.0.0.1", self.ports["mx"])

    @property
    def pop3(self) -> tuple[str, int]:
        return ("127.0.0.1", self.ports["pop3"])

    @property
    def pop3s(self) -> tuple[str, int]:
        return ("127.0.0.1", self.ports["pop3s"])

    @property
    def imap(self) -> tuple[str, int]:
        return ("127.0.0.1", self.ports["imap"])

    @property
    def imaps(self) -> tuple[str, int]:
        return ("127.0.0.1", self.ports["imaps"])

    @property
    def submission(self) -> tuple[str, int]:
        return ("127.0.0.1", self.ports["submission"])

    @property
    def submissions(self) -> tuple[str, int]:
        return ("127.0.0.1", self.ports["submissions"])

    @property
    def http(self) -> tuple[str, int]:
        return ("127.0.0.1", self.ports["http"])

    @property
    def store(self) -> Store:
        """The same store the server uses, opened in the test process."""
        if self._store is None:
            self._store = open_store(self.db_url, pool_size=2, migrate=False)
        return self._store

    def command(self) -> list[str]:
        twistd = str(Path(sys.executable).parent / "twistd")
        mode = [f"--pidfile={self.pidfile}"] if self.daemon else ["-n", "--pidfile="]
        return [twistd, *mode, "--logfile", str(self.log_path), "mailsuite",
                "--config", str(self.config_path)]

    def start(self, timeout: float = 30.0, attempts: int = 3) -> Mailsuite:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # A restart appends to the same log: only what this run writes counts.
        offset = len(self._read("twistd.log"))
        stderr_offset = len(self._read("stderr.log"))
        with open(self.workdir / "stderr.log", "ab") as stderr:
            self.process = subprocess.Popen(self.command(), cwd=self.workdir, env=env,
                                            stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        if self.daemon:
            return self._wait_daemon(deadline, offset)
        self.pid = self.process.pid
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self._read("twistd.log")[offset:]
                if self._own_ports and "CannotListenError" in log and attempts > 1:
                    self.ports = self._free_ports()  # someone took one meanwhile: new ones
                    self._write_config()
                    # Its traceback is the harness's race, not the server's: tests that
                    # check the log for tracebacks must see the run that serves them only.
                    self._set_aside_failed_start(offset, stderr_offset)
                    return self.start(timeout, attempts - 1)
                raise RuntimeError(f"mailsuite exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            if "mailsuite ready:" in self._read("twistd.log")[offset:]:
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mailsuite did not start in {timeout}s:\n{self.log()}")

    def _set_aside_failed_start(self, offset: int, stderr_offset: int) -> None:
        """Move what a start that lost its port wrote to port-taken.log."""
        with open(self.workdir / "port-taken.log", "a", encoding="utf-8") as aside:
            for name, start in (("twistd.log", offset), ("stderr.log", stderr_offset)):
                text = self._read(name)
                aside.write(text[start:])
                (self.workdir / name).write_text(text[:start], encoding="utf-8")

    def _wait_daemon(self, deadline: float, offset: int) -> Mailsuite:
        """twistd's parent exits 0 once the daemon is forked; then wait for the daemon."""
        assert self.process is not None
        self.process.wait(max(0.0, deadline - time.monotonic()))
        if self.process.returncode != 0:
            raise RuntimeError(f"twistd exited with {self.process.returncode}:\n{self.log()}")
        self.process = None
        while time.monotonic() < deadline:
            if self.pid is None and self.pidfile.exists():
                text = self.pidfile.read_text().strip()
                self.pid = int(text) if text else None
            if "mailsuite ready:" in self._read("twistd.log")[offset:]:
                assert self.pid is not None, "ready without a pidfile"
                return self
            if self.pid is not None and not Path(f"/proc/{self.pid}").exists():
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the mailsuite daemon did not start:\n{self.log()}")

    def _stop_daemon(self, sig: int, timeout: float) -> None:
        """Signal the pid in the pidfile, as an init script does, and wait for it to go."""
        self.pid = None
        if not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text().strip())
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
            while Path(f"/proc/{pid}").exists():
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.daemon:
            self._stop_daemon(sig, timeout)
            self._close_store()
            return
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.pid = None
        self._close_store()

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def _read(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def log(self) -> str:
        return self._read("twistd.log") + self._read("stderr.log")

    # --- test data -----------------------------------------------------------------------
    def new_domain(self) -> str:
        domain = f"d{secrets.token_hex(4)}.test"
        self.store.domain_add(domain)
        return domain

    def new_account(self, domain: str | None = None, password: str = "correct horse") -> str:
        domain = domain or self.new_domain()
        address = f"u{secrets.token_hex(4)}@{domain}"
        self.store.account_add(address, hash_password(password, rounds=4))
        return address

    def inbox(self, address: str) -> list[bytes]:
        return [m.raw for m in self.store.messages(address)]


def own_server(backend: str, new_db_url: Callable[[str], str], dns_address: str,
               tmp_path_factory: Any, name: str,
               overrides: dict[str, dict[str, Any]] | None = None) -> Iterator[Mailsuite]:
    """A server for one test module (yield from it in a module-scoped fixture)."""
    server = Mailsuite(tmp_path_factory.mktemp(f"{name}-{backend}"), new_db_url(backend),
                       dns_address, overrides)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def wait_listening(address: tuple[str, int], timeout: float = 30.0) -> None:
    """Block until `address` accepts TCP connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# A delivery agent for fetchmail and getmail: stdin into a Maildir, atomically (tmp, then new).
MAILDIR_MDA = """\
import os, secrets, sys, time
maildir = sys.argv[1]
name = f"{time.time_ns()}.{os.getpid()}.{secrets.token_hex(4)}"
data = sys.stdin.buffer.read()
with open(os.path.join(maildir, "tmp", name), "wb") as handle:
    handle.write(data)
os.rename(os.path.join(maildir, "tmp", name), os.path.join(maildir, "new", name))
"""
