"""Password-guessing benchmark: how fast do other addresses log in while one address guesses?

Usage (from the repository root)::

    .venv/bin/python scripts/bench/login_attack.py                    # IMAP, SQLite, 20 s
    .venv/bin/python scripts/bench/login_attack.py --protocol pop3 --attackers 20
    .venv/bin/python scripts/bench/login_attack.py --backend postgresql --duration 30

What it does:

* starts a loopback DNS server and the real server (``twistd -n mailsuite`` through
  tests/harness.Mailsuite) on a fresh database, with ``[auth] allow_plaintext = true`` (so
  that TLS does not blur the figures), ``bcrypt_rounds = --rounds`` and per-address connection
  caps above ``--attackers``, so that only the login defences stand in the attacker's way;
* creates one victim account, its password hashed at ``--rounds``;
* the attacker: ``--attackers`` connections from 127.0.0.2, each looping LOGIN (or USER/PASS,
  or AUTH PLAIN) with wrong passwords for the victim's account as fast as the server answers,
  reconnecting whenever the server hangs up or refuses it at the greeting;
* the victim: from 127.0.0.3, one client after another connects, logs in with the right
  password and logs out; the time from connect to the login's answer is its latency. It is
  measured alone first (a quarter of ``--duration``, at most 5 s: the cost of its own bcrypt
  on this machine), then during the attack;
* after ``--duration`` seconds (at most 120) everything stops; it prints the victim's login
  latency p50/p99/max, what the attacker got (answers, hang-ups, greeting refusals), and the
  server's CPU.

Loopback only: every address used is in 127.0.0.0/8 and the server is started here. Everything
started (server, DNS server, database, temporary directory) is torn down on exit, Ctrl-C or
SIGTERM included.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(path) for path in (BENCH.parents[1], BENCH) if str(path) not in sys.path]

import common  # noqa: E402

from mailsuite.passwords import hash_password  # noqa: E402
from tests.dnsserver import DNSServerHandle  # noqa: E402

DOMAIN = "mailsuite-bench.test"
VICTIM = f"victim@{DOMAIN}"
PASSWORD = "the right password"
ATTACKER_IP = "127.0.0.2"
VICTIM_IP = "127.0.0.3"
MAX_DURATION = 120.0


class Closed(Exception):
    """The server hung up."""


class Client:
    """A line client for the three login dialects, bound to a chosen loopback address."""

    def __init__(self, address: tuple[str, int], source: str, protocol: str,
                 timeout: float) -> None:
        self.protocol = protocol
        self.sock = socket.socket()
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect(address)
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            try:
                data = self.sock.recv(4096)
            except ConnectionResetError as exc:
                raise Closed from exc
            if not data:
                raise Closed
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    @property
    def refused(self) -> bool:
        return not self.greeting.startswith((b"* OK", b"+OK", b"220"))

    def login(self, user: str, password: str) -> bool:
        """One login attempt: True when accepted."""
        if self.protocol == "imap":
            self.sock.sendall(f'a LOGIN "{user}" "{password}"\r\n'.encode())
            while not (line := self.line()).startswith(b"a "):
                pass
            return line.startswith(b"a OK")
        if self.protocol == "pop3":
            self.sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
            self.line()
            return self.line().startswith(b"+OK")
        plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.sock.sendall(f"EHLO bench.test\r\nAUTH PLAIN {plain}\r\n".encode())
        while not self.line().startswith(b"250 "):
            pass
        return self.line().startswith(b"235")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Tally:
    attempts: int = 0  # wrong passwords answered
    hangups: int = 0  # connections the server closed
    refusals: int = 0  # connections refused at the greeting
    victim: list[float] = field(default_factory=list)
    calm: list[float] = field(default_factory=list)  # the victim's logins before the attack
    victim_failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def attacker(address: tuple[str, int], protocol: str, stop: float, tally: Tally,
             number: int) -> None:
    guess = 0
    while time.monotonic() < stop:
        try:
            client = Client(address, ATTACKER_IP, protocol,
                            timeout=max(1.0, stop - time.monotonic()))
        except OSError:
            time.sleep(0.1)
            continue
        try:
            if client.refused:
                with tally.lock:
                    tally.refusals += 1
                time.sleep(0.1)
                continue
            while time.monotonic() < stop:
                guess += 1
                client.login(VICTIM, f"wrong {number}.{guess}")
                with tally.lock:
                    tally.attempts += 1
        except Closed:
            with tally.lock:
                tally.hangups += 1
        except OSError:
            pass  # our own timeout at the end of the run
        finally:
            client.close()


def victim(address: tuple[str, int], protocol: str, start: float, stop: float,
           tally: Tally, times: list[float]) -> None:
    while time.monotonic() < start:
        time.sleep(0.05)
    while time.monotonic() < stop:
        began = time.perf_counter()
        try:
            client = Client(address, VICTIM_IP, protocol, timeout=60)
            ok = client.login(VICTIM, PASSWORD)
            client.close()
        except (OSError, Closed):
            ok = False
        elapsed = time.perf_counter() - began
        with tally.lock:
            if ok:
                times.append(elapsed)
            else:
                tally.victim_failures += 1
        time.sleep(0.1)


@dataclass
class Result:
    backend: str
    protocol: str
    attackers: int
    rounds: int
    duration: float
    tally: Tally
    server_cpu: float | None

    def block(self) -> str:
        def latency(values: list[float]) -> str:
            if not values:
                return "n/a"
            values = sorted(values)
            return (f"p50 {common.percentile(values, 50) * 1000:.0f} ms, p99 "
                    f"{common.percentile(values, 99) * 1000:.0f} ms, max "
                    f"{values[-1] * 1000:.0f} ms ({len(values)} logins)")

        rows = [
            ("backend / protocol", f"{self.backend} / {self.protocol}"),
            ("attack", f"{self.attackers} connections from {ATTACKER_IP}, {self.duration:.0f} s,"
                       f" bcrypt cost {self.rounds}"),
            ("victim alone", latency(self.tally.calm)),
            ("victim attacked", latency(self.tally.victim)),
            ("victim failures", str(self.tally.victim_failures)),
            ("attacker", f"{self.tally.attempts} wrong passwords answered, "
                         f"{self.tally.hangups} hang-ups, "
                         f"{self.tally.refusals} refused at the greeting"),
            ("server CPU", common.format_cpu(self.server_cpu, self.duration)),
        ]
        return common.format_block("mailsuite login attack", rows)


def run_backend(backend: str, args: argparse.Namespace, dns: DNSServerHandle,
                workdir: Path) -> Result:
    overrides = {
        "auth": {"allow_plaintext": True, "bcrypt_rounds": args.rounds},
        "imap": {"max_connections_per_ip": args.attackers + 10},
        "pop3": {"max_connections_per_ip": args.attackers + 10},
        "smtp": {"max_connections_per_ip": args.attackers + 10},
    }
    with contextlib.ExitStack() as stack:
        db_url, _ = stack.enter_context(common.backend_database(backend, workdir, args.pg_url))
        print(f"[{backend}] starting server ...", flush=True)
        server = stack.enter_context(common.running_server(workdir, db_url, dns, overrides))
        assert server.process is not None
        server.store.domain_add(DOMAIN)
        server.store.account_add(VICTIM, hash_password(PASSWORD, rounds=args.rounds))
        address = getattr(server, args.protocol)
        tally = Tally()
        calm = min(5.0, args.duration / 4)
        print(f"[{backend}] the victim alone for {calm:.0f} s ...", flush=True)
        now = time.monotonic()
        victim(address, args.protocol, now, now + calm, tally, tally.calm)
        now = time.monotonic()
        # The victim starts once the attack is under way.
        start, stop = now + min(2.0, args.duration / 4), now + args.duration
        cpu_before = common.proc_cpu_seconds(server.process.pid)
        print(f"[{backend}] attacking for {args.duration:.0f} s ...", flush=True)
        threads = [threading.Thread(target=attacker, daemon=True,
                                    args=(address, args.protocol, stop, tally, n))
                   for n in range(args.attackers)]
        threads.append(threading.Thread(target=victim, daemon=True,
                                        args=(address, args.protocol, start, stop, tally,
                                              tally.victim)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, stop - time.monotonic()) + 70)
        cpu_after = common.proc_cpu_seconds(server.process.pid)
        server_cpu = (cpu_after - cpu_before
                      if cpu_after is not None and cpu_before is not None else None)
        return Result(backend, args.protocol, args.attackers, args.rounds, args.duration,
                      tally, server_cpu)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Login latency of a victim while one address guesses passwords.")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument("--protocol", choices=["imap", "pop3", "submission"], default="imap")
    parser.add_argument("--attackers", type=int, default=80, metavar="N",
                        help="attacking connections from one address (80, at most 200)")
    parser.add_argument("--duration", type=float, default=20.0, metavar="S",
                        help=f"seconds of attack (20, at most {MAX_DURATION:.0f})")
    parser.add_argument("--rounds", type=int, default=12,
                        help="bcrypt cost of the server and of the victim's hash (12)")
    common.add_pg_url_argument(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.attackers <= 200 or not 1 <= args.duration <= MAX_DURATION:
        parser.error("--attackers must be 1..200 and --duration 1..120")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.prepare_run()
    _, failed = common.run_each_backend(
        "mailsuite-login-attack-", {"records": {}}, common.backends_of(args.backend),
        lambda backend, dns, workdir: run_backend(backend, args, dns, workdir))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
