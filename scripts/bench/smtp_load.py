"""SMTP load benchmark: the real mailsuite MX, DKIM-signed mail, SPF/DKIM/DMARC really checked.

Usage (from the repository root)::

    .venv/bin/python scripts/bench/smtp_load.py --backend both
    .venv/bin/python scripts/bench/smtp_load.py --backend sqlite --messages 500
    .venv/bin/python scripts/bench/smtp_load.py --backend postgresql --connections 20 --size 20000

What it does, per backend:

* starts a loopback DNS server (tests/dnsserver.py) publishing SPF (``v=spf1 ip4:127.0.0.1
  -all``), DMARC (``v=DMARC1; p=reject``) and a DKIM key for the sender domain
  ``bench-sender.test``;
* starts the real server (``twistd -n mailsuite``, through tests/harness.Mailsuite) with
  greeting_delay 0 on a fresh database: a temporary SQLite file, or a throwaway PostgreSQL
  database ``mailsuite_bench_<hex>`` created through ``--pg-url`` and dropped afterwards;
* creates one domain and one account through the store;
* runs ``--connections`` client processes, each holding one persistent SMTP connection and
  sending its share of ``--messages`` messages (MAIL, RCPT, DATA per message) of about
  ``--size`` bytes to that account. One message is DKIM-signed once; every message differs
  only in an unsigned ``X-Bench-Seq`` header, so the server verifies a valid signature on each;
* checks that the INBOX holds exactly ``--messages`` messages, one per sequence number, and
  (with authentication checks on) that each carries spf=pass, dkim=pass and dmarc=pass;
* prints elapsed time, messages/s, p50/p99 accept latency (MAIL FROM sent -> 250 after
  end-of-data read), CPU used by server and clients, and the server's peak RSS (VmHWM).

Options: ``--backend sqlite|postgresql|both`` (default both), ``--connections`` (10),
``--messages`` (2000), ``--size`` (4096), ``--pg-url`` (default $MAILSUITE_TEST_PG_URL or
postgresql://postgres@127.0.0.1:5432/postgres), ``--no-auth-checks`` (checks are on by
default, as in production), ``--pipelining`` (send MAIL, RCPT and DATA in one write, as the
server advertises PIPELINING; default is one command per round trip).

Everything started here (server, DNS server, client processes, the PostgreSQL database, the
temporary directory) is torn down on exit, Ctrl-C or SIGTERM included.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import signal
import socket
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script: importable from the repository root (mailsuite, tests) and from this
# directory (common), wherever it is started from.
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(path) for path in (BENCH.parents[1], BENCH) if str(path) not in sys.path]

import common  # noqa: E402
import dkim  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from mailsuite.passwords import hash_password  # noqa: E402
from tests.dnsserver import DNSServerHandle  # noqa: E402
from tests.harness import Mailsuite  # noqa: E402

SENDER_DOMAIN = "bench-sender.test"
SENDER = f"bench@{SENDER_DOMAIN}"
DKIM_SELECTOR = "bench"
RCPT_DOMAIN = "mailsuite-bench.test"
RCPT = f"inbox@{RCPT_DOMAIN}"
HELO = f"client.{SENDER_DOMAIN}"


# ------------------------------------------------------------------------------ messages


def make_dkim_key() -> tuple[bytes, str]:
    """(private key PEM, the p= value of its DNS record), as tests/conftest.py makes them."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode("ascii")


def sender_zones(dkim_public: str) -> dict[str, Any]:
    def txt(value: str) -> dict[str, str]:
        return {"type": "TXT", "value": value}

    return {"records": {
        SENDER_DOMAIN: [txt("v=spf1 ip4:127.0.0.1 -all")],
        f"_dmarc.{SENDER_DOMAIN}": [txt("v=DMARC1; p=reject")],
        f"{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}": [txt(dkim_record(dkim_public))],
    }}


def _body(size: int) -> bytes:
    """About `size` bytes of text in 78-octet CRLF lines; no line starts with a dot."""
    return common.text_body(size, 4096) or b"x\r\n"


def _signed(body: bytes, pem: bytes) -> bytes:
    headers = (
        f"From: Bench Sender <{SENDER}>\r\n"
        f"To: <{RCPT}>\r\n"
        "Subject: mailsuite SMTP load benchmark\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <bench.{secrets.token_hex(8)}@{SENDER_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    message = headers + body
    signature = dkim.sign(message, DKIM_SELECTOR.encode(), SENDER_DOMAIN.encode(), pem,
                          canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID",
                                           b"MIME-Version", b"Content-Type"])
    return signature + message


def dkim_record(public: str) -> str:
    return f"v=DKIM1; k=rsa; p={public}"


def make_template(size: int, pem: bytes, public: str) -> bytes:
    """A DKIM-signed message of about `size` bytes once the X-Bench-Seq header is added.

    Returned dot-stuffed and ending with the CRLF.CRLF end-of-data marker, ready for DATA.
    """
    seq_overhead = len(common.SEQ_HEADER) + len(b": 000000\r\n")
    probe = _signed(_body(64), pem)  # measure headers + signature, then size the body
    overhead = len(probe) - len(_body(64)) + seq_overhead
    message = _signed(_body(max(3, size - overhead)), pem)
    record = dkim_record(public).encode()
    if not dkim.verify(message, dnsfunc=lambda name, timeout=5: record):
        raise RuntimeError("the benchmark message does not verify against its own DKIM key")
    stuffed = (b"\r\n" + message).replace(b"\r\n.", b"\r\n..")[2:]
    return stuffed + b".\r\n"


# -------------------------------------------------------------------------------- client


class SMTPError(Exception):
    pass


class Replies:
    """Reads SMTP replies from a blocking socket with as little work per reply as possible."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def expect(self, code: bytes, what: str) -> None:
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise SMTPError(f"{what}: connection closed by server")
                self.buf += chunk
                continue
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            if line[3:4] == b"-":
                continue  # continuation of a multi-line reply
            if line[:3] != code:
                raise SMTPError(f"{what}: expected {code.decode()}, got {line!r}")
            return


def client_worker(host: str, port: int, seqs: range, template: bytes, pipelining: bool,
                  barrier: Any, results: Any, index: int) -> None:
    """One connection: greet, wait for the start, send every message of `seqs`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; no tracebacks
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        sock = socket.create_connection((host, port), timeout=120)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = Replies(sock)
        replies.expect(b"220", "greeting")
        sock.sendall(f"EHLO {HELO}\r\n".encode())
        replies.expect(b"250", "EHLO")
        mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
        rcpt = f"RCPT TO:<{RCPT}>\r\n".encode()
        data = b"DATA\r\n"
        envelope = mail + rcpt + data
        latencies = array("d")
        clock = time.perf_counter
        barrier.wait(timeout=120)
        for seq in seqs:
            message = b"%s: %06d\r\n%s" % (common.SEQ_HEADER, seq, template)
            start = clock()
            if pipelining:
                sock.sendall(envelope)
                replies.expect(b"250", "MAIL FROM")
                replies.expect(b"250", "RCPT TO")
                replies.expect(b"354", "DATA")
            else:
                sock.sendall(mail)
                replies.expect(b"250", "MAIL FROM")
                sock.sendall(rcpt)
                replies.expect(b"250", "RCPT TO")
                sock.sendall(data)
                replies.expect(b"354", "DATA")
            sock.sendall(message)
            replies.expect(b"250", f"end of data (message {seq})")
            latencies.append(clock() - start)
        finished = time.monotonic()
        with contextlib.suppress(OSError):
            sock.sendall(b"QUIT\r\n")
            replies.expect(b"221", "QUIT")
        sock.close()
        results.put((index, latencies.tobytes(), finished, None))
    except BaseException as exc:  # report everything to the parent, then stop the others
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((index, b"", 0.0, f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------------- setup


def server_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    # No greeting delay and a per-IP cap above --connections: neither is what is measured.
    overrides: dict[str, dict[str, Any]] = {
        "smtp": {"greeting_delay": 0.0,
                 "max_connections_per_ip": max(20, args.connections + 10)},
        "mx": {"auth_checks": not args.no_auth_checks},
    }
    if args.processes > 1:
        overrides["server"] = {"reuse_port": True}  # every process on the same ports
    return overrides


# ----------------------------------------------------------------------------------- run


@dataclass
class Result:
    backend: str
    connections: int
    processes: int
    messages: int
    size: int
    wire_size: int
    auth_checks: bool
    pipelining: bool
    elapsed: float
    latencies: list[float]
    stored: int
    auth_summary: str
    server_cpu: float | None
    client_cpu: float
    postgres_cpu: float | None
    host_busy: float | None
    peak_rss_kib: int | None
    server_pid: int

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed if self.elapsed > 0 else float("nan")

    def block(self) -> str:
        ms = sorted(v * 1000 for v in self.latencies)
        cores = os.cpu_count() or 1

        def cpu(seconds: float | None) -> str:
            return common.format_cpu(seconds, self.elapsed)

        rows = [
            ("backend", self.backend),
            ("connections", str(self.connections)),
            ("server processes", str(self.processes)),
            ("messages", f"{self.messages} (INBOX holds {self.stored})"),
            ("size", f"{self.size} bytes requested, {self.wire_size} bytes per message"),
            ("auth checks", ("on: " + self.auth_summary) if self.auth_checks else "off"),
            ("pipelining", "on" if self.pipelining else "off"),
            ("elapsed", f"{self.elapsed:.2f} s"),
            ("throughput", f"{self.rate:.1f} messages/s"),
            ("latency p50", f"{common.percentile(ms, 50):.1f} ms"),
            ("latency p99", f"{common.percentile(ms, 99):.1f} ms"),
            ("latency max", f"{ms[-1]:.1f} ms" if ms else "n/a"),
            ("server CPU", cpu(self.server_cpu)),
            ("server CPU/msg", f"{1000 * self.server_cpu / self.messages:.2f} ms"
             if self.server_cpu is not None else "n/a"),
            ("client CPU", cpu(self.client_cpu)),
        ]
        if self.backend == "postgresql":
            rows.append(("postgres CPU", cpu(self.postgres_cpu)))
        if self.host_busy is not None:
            rows.append(("host CPU busy", f"{100 * self.host_busy:.0f}% of {cores} cores"))
        rss = f"{self.peak_rss_kib / 1024:.1f} MiB (VmHWM)" if self.peak_rss_kib else "n/a"
        rows.append(("server peak RSS", rss))
        return common.format_block(f"mailsuite SMTP load: {self.backend}", rows)


def verify_inbox(server: Mailsuite, messages: int, auth_checks: bool) -> tuple[int, str]:
    """(stored count, auth summary); raises if the INBOX is not exactly what was sent."""
    stored = server.store.messages(RCPT)
    seqs, passes = set(), 0
    for message in stored:
        head = message.raw.split(b"\r\n\r\n", 1)[0]
        marker = head.find(common.SEQ_HEADER + b": ")
        if marker >= 0:
            seqs.add(int(head[marker + len(common.SEQ_HEADER) + 2:].split(b"\r\n", 1)[0]))
        start = head.lower().find(b"authentication-results:")
        if start >= 0:
            value = head[start:].split(b"\r\n", 1)[0]
            rest = head[start:].split(b"\r\n")[1:]
            for line in rest:  # unfold the header
                if not line[:1].isspace():
                    break
                value += line
            if all(f"{m}=pass".encode() in value for m in ("spf", "dkim", "dmarc")):
                passes += 1
    if len(stored) != messages or seqs != set(range(messages)):
        raise RuntimeError(f"INBOX holds {len(stored)} messages ({len(seqs)} distinct sequence "
                           f"numbers), expected exactly {messages}")
    if auth_checks and passes != messages:
        raise RuntimeError(f"only {passes}/{messages} messages have spf=pass dkim=pass "
                           "dmarc=pass in Authentication-Results")
    summary = f"spf=pass dkim=pass dmarc=pass on {passes}/{messages}" if auth_checks else ""
    return len(stored), summary


def run_clients(server: Mailsuite, template: bytes, args: argparse.Namespace,
                on_start: Callable[[], None]) -> tuple[float, list[float], float]:
    """(elapsed seconds, per-message latencies, client CPU seconds)."""
    conns = args.connections
    host, port = server.mx
    cpu_before = common.children_cpu_seconds()
    with common.ClientProcesses(conns, "bench-client") as clients:
        for index in range(conns):
            seqs = range(index, args.messages, conns)  # distinct seqs, shares differ by <= 1
            clients.start(client_worker, (host, port, seqs, template, args.pipelining))
        clients.wait_for_start(timeout=120)
        started = time.monotonic()
        on_start()
        finished, latencies = clients.collect_latencies(started)
        clients.join(10)
        return finished - started, latencies, common.children_cpu_seconds() - cpu_before


def run_backend(backend: str, args: argparse.Namespace, dns: DNSServerHandle, template: bytes,
                workdir: Path) -> Result:
    with contextlib.ExitStack() as stack:
        db_url, postgres_cpu = stack.enter_context(
            common.backend_database(backend, workdir, args.pg_url))
        print(f"[{backend}] starting server ...", flush=True)
        server = stack.enter_context(
            common.running_server(workdir, db_url, dns, server_overrides(args)))
        assert server.process is not None
        pid = server.process.pid
        pids = [pid]
        for extra in range(1, args.processes):
            other = Mailsuite(workdir / f"process-{extra}", db_url, dns.address,
                              server_overrides(args), ports=server.ports)
            stack.callback(other.stop)
            other.start(timeout=60)
            assert other.process is not None
            pids.append(other.process.pid)
        server.store.domain_add(RCPT_DOMAIN)
        server.store.account_add(RCPT, hash_password(secrets.token_hex(8), rounds=4))
        print(f"[{backend}] server pid {pid} on {server.mx[0]}:{server.mx[1]}; sending "
              f"{args.messages} messages over {args.connections} connections ...", flush=True)

        samples: dict[str, Any] = {}

        def cpu_of_servers() -> float | None:
            values = [common.proc_cpu_seconds(p) for p in pids]
            return None if None in values else sum(v for v in values if v is not None)

        def on_start() -> None:
            samples["server_cpu"] = cpu_of_servers()
            samples["host"] = common.host_cpu_jiffies()
            if postgres_cpu is not None:
                postgres_cpu.begin()

        elapsed, latencies, client_cpu = run_clients(server, template, args, on_start)
        server_cpu_end = cpu_of_servers()
        host_end = common.host_cpu_jiffies()
        pg_cpu = postgres_cpu.end() if postgres_cpu is not None else None
        busy0, total0 = samples["host"]
        host_busy = ((host_end[0] - busy0) / (host_end[1] - total0)
                     if host_end[1] > total0 else None)
        server_cpu = (server_cpu_end - samples["server_cpu"]
                      if server_cpu_end is not None and samples["server_cpu"] is not None
                      else None)
        peak = max((common.proc_peak_rss_kib(p) or 0) for p in pids) or None
        stored, auth_summary = verify_inbox(server, args.messages, not args.no_auth_checks)
        return Result(
            backend=backend, connections=args.connections, processes=args.processes,
            messages=args.messages,
            size=args.size, wire_size=len(template) - 3 + len(common.SEQ_HEADER) + 10,
            auth_checks=not args.no_auth_checks, pipelining=args.pipelining, elapsed=elapsed,
            latencies=latencies, stored=stored, auth_summary=auth_summary,
            server_cpu=server_cpu, client_cpu=client_cpu, postgres_cpu=pg_cpu,
            host_busy=host_busy, peak_rss_kib=peak, server_pid=pid,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="SMTP load benchmark of the mailsuite MX (see the module docstring).")
    common.add_backend_argument(parser)
    parser.add_argument("--connections", type=int, default=10, metavar="C",
                        help="concurrent SMTP connections, one client process each (10)")
    parser.add_argument("--messages", type=int, default=2000, metavar="M",
                        help="messages in total, shared among the connections (2000)")
    parser.add_argument("--size", type=int, default=4096, metavar="BYTES",
                        help="approximate size of each message (4096)")
    common.add_pg_url_argument(parser)
    parser.add_argument("--no-auth-checks", action="store_true",
                        help="turn off SPF/DKIM/ARC/DMARC verification ([mx] auth_checks)")
    parser.add_argument("--processes", type=int, default=1, metavar="P",
                        help="server processes sharing the port with [server] reuse_port "
                             "(PostgreSQL; default %(default)s)")
    parser.add_argument("--pipelining", action="store_true",
                        help="send MAIL, RCPT and DATA in one write (RFC 2920)")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.messages < 1 or args.size < 1:
        parser.error("--connections, --messages and --size must be positive")
    if args.messages > 999_999:
        parser.error("--messages is limited to 999999")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = common.backends_of(args.backend)
    common.prepare_run()

    pem, public = make_dkim_key()
    template = make_template(args.size, pem, public)
    results, failed = common.run_each_backend(
        "mailsuite-bench-", sender_zones(public), backends,
        lambda backend, dns, workdir: run_backend(backend, args, dns, template, workdir),
        keep_only_for_logs=True)
    if len(results) > 1:
        print(common.SUMMARY_TITLE)
        print(f"{'backend':<12}{'msg/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'elapsed s':>12}")
        for r in results:
            ms = sorted(v * 1000 for v in r.latencies)
            print(f"{r.backend:<12}{r.rate:>10.1f}{common.percentile(ms, 50):>10.1f}"
                  f"{common.percentile(ms, 99):>10.1f}{r.elapsed:>12.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
