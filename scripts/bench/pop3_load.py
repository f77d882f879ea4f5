"""POP3 download benchmark: one client empties (reads) a 10,000-message maildrop with RETR.

Usage (from the repository root)::

    .venv/bin/python scripts/bench/pop3_load.py                      # both backends
    .venv/bin/python scripts/bench/pop3_load.py --backend sqlite --messages 2000
    .venv/bin/python scripts/bench/pop3_load.py --via pop3s --size 20000

What it does, per backend:

* starts a loopback DNS server (tests/dnsserver.py; the server wants a resolver) and the real
  server (``twistd -n mailsuite`` through tests/harness.Mailsuite) with
  ``[auth] allow_plaintext = true`` on a fresh database: a temporary SQLite file, or a
  throwaway PostgreSQL database ``mailsuite_bench_<hex>`` created through ``--pg-url`` and
  dropped afterwards;
* creates one account and fills its INBOX with ``--messages`` distinct messages of about
  ``--size`` bytes straight through the store (``Store.deliver_many``, ``--batch`` messages
  per transaction), which is much faster than SMTP and not what is measured;
* logs in with poplib (USER/PASS over plain TCP, or ``--via stls|pop3s``) and times the
  login, which takes the snapshot of the whole maildrop, then STAT, LIST and UIDL;
* RETRs every message in order on that one connection, checking each one's size and its
  ``X-Bench-Seq`` header, then QUITs without deleting anything;
* checks that every message now carries \\Seen (RETR sets it, one write per message) and
  prints messages/s, MB/s (10^6 bytes of message per second, before dot-stuffing), the
  login time, CPU used by the server and by the client, and the server's peak RSS.

Options: ``--backend sqlite|postgresql|both`` (default both), ``--messages`` (10000),
``--size`` (4096), ``--batch`` (500), ``--via plain|stls|pop3s`` (plain), ``--pg-url``
(default $MAILSUITE_TEST_PG_URL or postgresql://postgres@127.0.0.1:5432/postgres).

Everything started here (server, DNS server, the PostgreSQL database, the temporary
directory) is torn down on exit, Ctrl-C or SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import poplib
import secrets
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script: importable from the repository root (mailsuite, tests) and from this
# directory (common), wherever it is started from.
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(path) for path in (BENCH.parents[1], BENCH) if str(path) not in sys.path]

import common  # noqa: E402

from mailsuite.passwords import hash_password  # noqa: E402
from mailsuite.store import Delivery  # noqa: E402
from tests.dnsserver import DNSServerHandle  # noqa: E402
from tests.harness import Mailsuite  # noqa: E402

DOMAIN = "mailsuite-bench.test"
ADDRESS = f"pop3@{DOMAIN}"
PASSWORD = "bench password"


# ------------------------------------------------------------------------------ messages


def make_body(size: int) -> bytes:
    """About `size` bytes of text in CRLF lines of at most 78 octets; some start with a dot,
    so that dot-stuffing is part of the work."""
    return common.text_body(size, 1939, dot_lines=True)


def make_message(seq: int, body: bytes) -> bytes:
    return (f"From: Bench <bench@sender.test>\r\n"
            f"To: <{ADDRESS}>\r\n"
            f"Subject: POP3 benchmark message {seq}\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
            f"Message-ID: <bench.{seq}.{secrets.token_hex(6)}@sender.test>\r\n"
            f"{common.SEQ_HEADER.decode()}: {seq:06d}\r\n"
            "\r\n").encode() + body


def body_for(size: int) -> bytes:
    """The body that makes a whole message about `size` bytes long."""
    overhead = len(make_message(0, b""))
    return make_body(max(16, size - overhead))


# --------------------------------------------------------------------------------- setup


# --via plain sends USER/PASS without TLS, which the server refuses unless allowed.
SERVER_OVERRIDES: dict[str, dict[str, Any]] = {"auth": {"allow_plaintext": True}}


def fill_inbox(server: Mailsuite, account_id: int, args: argparse.Namespace) -> tuple[int, float]:
    """Deliver --messages messages through the store; (total bytes, seconds taken)."""
    body = body_for(args.size)
    return common.deliver_in_batches(
        server, args.messages, args.batch,
        lambda seq: Delivery(make_message(seq, body), (account_id,)))


# ----------------------------------------------------------------------------------- run


@dataclass
class Result:
    backend: str
    via: str
    messages: int
    total_bytes: int
    fill_seconds: float
    login_seconds: float
    stat_seconds: float
    list_seconds: float
    uidl_seconds: float
    retr_seconds: float
    wire_bytes: int
    server_cpu: float | None
    client_cpu: float
    peak_rss_kib: int | None

    @property
    def rate(self) -> float:
        return self.messages / self.retr_seconds

    @property
    def mb_rate(self) -> float:
        return self.total_bytes / self.retr_seconds / 1e6

    def block(self) -> str:
        def cpu(seconds: float | None) -> str:
            return common.format_cpu(seconds, self.retr_seconds)

        rows = [
            ("backend", self.backend),
            ("transport", self.via),
            ("maildrop", f"{self.messages} messages, {self.total_bytes / 1e6:.1f} MB "
                         f"({self.total_bytes // self.messages} bytes each)"),
            ("fill (store)", f"{self.fill_seconds:.1f} s, not part of the figures below"),
            ("login", f"{self.login_seconds * 1000:.0f} ms (USER+PASS, snapshot of "
                      f"{self.messages})"),
            ("STAT / LIST / UIDL", f"{self.stat_seconds * 1000:.1f} / "
                                   f"{self.list_seconds * 1000:.0f} / "
                                   f"{self.uidl_seconds * 1000:.0f} ms"),
            ("RETR all", f"{self.retr_seconds:.2f} s"),
            ("throughput", f"{self.rate:.0f} messages/s, {self.mb_rate:.2f} MB/s "
                           f"({self.wire_bytes / self.retr_seconds / 1e6:.2f} MB/s on the "
                           "wire)"),
            ("server CPU", cpu(self.server_cpu)),
            ("client CPU", cpu(self.client_cpu) + " (poplib)"),
            ("server peak RSS", f"{self.peak_rss_kib / 1024:.1f} MiB (VmHWM)"
             if self.peak_rss_kib else "n/a"),
        ]
        return common.format_block(f"mailsuite POP3 RETR load: {self.backend}", rows)


def connect(server: Mailsuite, via: str) -> poplib.POP3:
    if via == "pop3s":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return poplib.POP3_SSL(*server.pop3s, timeout=300, context=context)
    client = poplib.POP3(*server.pop3, timeout=300)
    if via == "stls":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.stls(context)
    return client


def timed(call: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def run_backend(backend: str, args: argparse.Namespace, dns: DNSServerHandle,
                workdir: Path) -> Result:
    with contextlib.ExitStack() as stack:
        db_url, _ = stack.enter_context(common.backend_database(backend, workdir, args.pg_url))
        print(f"[{backend}] starting server ...", flush=True)
        server = stack.enter_context(common.running_server(workdir, db_url, dns, SERVER_OVERRIDES))
        assert server.process is not None
        pid = server.process.pid
        server.store.domain_add(DOMAIN)
        account_id = server.store.account_add(ADDRESS, hash_password(PASSWORD, rounds=4))
        print(f"[{backend}] filling the INBOX with {args.messages} messages ...", flush=True)
        total_bytes, fill_seconds = fill_inbox(server, account_id, args)
        sizes = {m.uid: m.size for m in server.store.messages(ADDRESS)}
        if len(sizes) != args.messages:
            raise RuntimeError(f"INBOX holds {len(sizes)} messages, not {args.messages}")

        print(f"[{backend}] server pid {pid}; RETR of every message over {args.via} ...",
              flush=True)
        client = connect(server, args.via)
        try:
            client.user(ADDRESS)
            answer, login_seconds = timed(lambda: client.pass_(PASSWORD))
            if not answer.startswith(b"+OK"):
                raise RuntimeError(f"login failed: {answer!r}")
            (count, octets), stat_seconds = timed(client.stat)
            if (count, octets) != (args.messages, total_bytes):
                raise RuntimeError(f"STAT says {count} {octets}, expected {args.messages} "
                                   f"{total_bytes}")
            (_, listing, _), list_seconds = timed(client.list)
            (_, uidls, _), uidl_seconds = timed(client.uidl)
            if len(listing) != args.messages or len(uidls) != args.messages:
                raise RuntimeError("LIST or UIDL does not list every message")

            cpu_server = common.proc_cpu_seconds(pid)
            cpu_client = common.own_cpu_seconds()
            wire = 0
            start = time.perf_counter()
            for number in range(1, args.messages + 1):
                response, lines, size = client.retr(number)
                wire += size
                # poplib has undone the dot-stuffing: check the message is whole and right.
                got = sum(len(line) + 2 for line in lines)
                want = int(listing[number - 1].split()[1])
                seq = next((line for line in lines[:8] if line.startswith(common.SEQ_HEADER)), b"")
                if got != want or seq != b"%s: %06d" % (common.SEQ_HEADER, number - 1):
                    raise RuntimeError(f"RETR {number}: {got} bytes (expected {want}), "
                                       f"{seq!r}")
            retr_seconds = time.perf_counter() - start
            cpu_client = common.own_cpu_seconds() - cpu_client
            cpu_end = common.proc_cpu_seconds(pid)
            server_cpu = (cpu_end - cpu_server
                          if cpu_end is not None and cpu_server is not None else None)
            client.quit()
        finally:
            client.close()
        unseen = [m.uid for m in server.store.messages(ADDRESS) if "\\Seen" not in m.flags]
        if unseen:
            raise RuntimeError(f"{len(unseen)} messages lack \\Seen after RETR")
        return Result(
            backend=backend, via=args.via, messages=args.messages, total_bytes=total_bytes,
            fill_seconds=fill_seconds, login_seconds=login_seconds, stat_seconds=stat_seconds,
            list_seconds=list_seconds, uidl_seconds=uidl_seconds, retr_seconds=retr_seconds,
            wire_bytes=wire, server_cpu=server_cpu, client_cpu=cpu_client,
            peak_rss_kib=common.proc_peak_rss_kib(pid),
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="POP3 RETR benchmark of mailsuite (see the module docstring).")
    common.add_backend_argument(parser)
    parser.add_argument("--messages", type=int, default=10_000, metavar="N",
                        help="messages in the maildrop (10000)")
    parser.add_argument("--size", type=int, default=4096, metavar="BYTES",
                        help="approximate size of each message (4096)")
    parser.add_argument("--batch", type=int, default=500, metavar="B",
                        help="deliveries per store transaction while filling (500)")
    parser.add_argument("--via", choices=["plain", "stls", "pop3s"], default="plain",
                        help="plain TCP (allow_plaintext), STLS, or implicit TLS (plain)")
    common.add_pg_url_argument(parser)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.size < 1 or args.batch < 1:
        parser.error("--messages, --size and --batch must be positive")
    if args.messages > 999_999:
        parser.error("--messages is limited to 999999")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = common.backends_of(args.backend)
    common.prepare_run()
    # No DNS records: the server only needs a resolver to start.
    results, failed = common.run_each_backend(
        "mailsuite-pop3-bench-", {"records": {}}, backends,
        lambda backend, dns, workdir: run_backend(backend, args, dns, workdir))
    if len(results) > 1:
        print(common.SUMMARY_TITLE)
        print(f"{'backend':<12}{'msg/s':>10}{'MB/s':>10}{'login ms':>10}{'RETR s':>10}")
        for r in results:
            print(f"{r.backend:<12}{r.rate:>10.0f}{r.mb_rate:>10.2f}"
                  f"{r.login_seconds * 1000:>10.0f}{r.retr_seconds:>10.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
