"""IMAP benchmark: a realistic command mix, a very large mailbox, and many idling clients.

Usage (from the repository root)::

    .venv/bin/python scripts/bench/imap_load.py                          # mix, both backends
    .venv/bin/python scripts/bench/imap_load.py --backend postgresql --seconds 20 \\
        --large 100000 --idlers 1000
    .venv/bin/python scripts/bench/imap_load.py --backend sqlite --seconds 0 --large 20000

Three scenarios, each on a freshly started server (``twistd -n mailsuite`` through
tests/harness.Mailsuite) with its own fresh database (a temporary SQLite file, or a throwaway
PostgreSQL database ``mailsuite_bench_<hex>`` created through ``--pg-url`` and dropped
afterwards). Clients log in without TLS on loopback (``[auth] allow_plaintext = true``);
the connection caps are raised (``[imap] max_connections_per_ip`` and
``max_connections_per_account`` = 5000) so that they never limit the benchmark.

mix (``--seconds``, default 20; 0 skips it)
    ``--accounts`` accounts (10), each INBOX filled through the store with ``--mailbox``
    messages (500) of about ``--size`` bytes (4096), then ``ANALYZE`` (see large).
    ``--clients`` client processes (10),
    client i on account i mod N, each on one persistent connection that it re-opens every
    ``--relogin-every`` rounds (10). One round is::

        SELECT INBOX                          UID FETCH 1:* (FLAGS)
        FETCH <last 20> (UID RFC822.SIZE ENVELOPE)
        FETCH <random> BODY[]   x3            STORE <random> +FLAGS (\\Flagged)
        STORE <random> -FLAGS (\\Seen)        APPEND INBOX (\\Seen) {n+}
        UID SEARCH SUBJECT "<the appended message's subject>"   (even rounds)
        SEARCH UNSEEN                                           (odd rounds)
        STORE 1 +FLAGS.SILENT (\\Deleted)     EXPUNGE
        every --relogin-every rounds: LOGOUT, reconnect, LOGIN

    so the mailbox keeps its size. Every answer is checked (tagged OK, the EXISTS count after
    SELECT, one FETCH response per message, APPENDUID, the SEARCH finding exactly the message
    just appended, the EXPUNGE response). Prints commands/s per kind and overall, p50/p99
    latency per kind, and CPU used by the server, PostgreSQL and the clients.

large (``--large N``; 0, the default, skips it)
    One INBOX filled with N messages straight through the store (``Store.deliver_many`` in
    batches of ``--batch``, with the IMAP structure precomputed from one template and patched
    per message, so ENVELOPE is right for every message), then ``ANALYZE`` (as autovacuum
    would do soon after; ``--no-analyze`` skips it and shows the planner without
    statistics on the new rows). Then one client times LOGIN,
    SELECT, ``UID FETCH 1:* (FLAGS)``, ``FETCH`` of the last 50 ENVELOPEs, one BODY[],
    ``UID SEARCH SUBJECT`` for one message's subject (a header search, loads every message),
    ``SEARCH UNSEEN`` (flags only), ``STATUS``, and a second SELECT; and reads the server's
    peak RSS (VmHWM).

idle (``--idlers K``; 0, the default, skips it)
    K accounts, one idling connection each (LOGIN, SELECT INBOX, IDLE), opened from one
    asyncio thread. Measures the server's RSS before and after, then the latency from the
    MX's 250 (end of DATA) to the idler reading ``* n EXISTS``: ``--idle-samples`` (100)
    deliveries one after another to random idlers, then one message to up to 100 idlers at
    once (one DATA, many RCPTs). Checks that no other idler hears anything and that every
    idler ends IDLE cleanly. RLIMIT_NOFILE of this process (and so of the server it starts)
    is raised to its hard limit first.

``--quickack`` makes the clients acknowledge every segment at once (TCP_QUICKACK). Real
clients delay their ACKs (Linux: 40 ms); a server that writes a command's untagged data and
its tagged status in two segments without TCP_NODELAY then waits for that ACK (Nagle) before
sending the status. Comparing runs with and without it shows what that costs.

Options: ``--backend sqlite|postgresql|both`` (default both), ``--pg-url`` (default
$MAILSUITE_TEST_PG_URL or postgresql://postgres@127.0.0.1:5432/postgres),
``--bcrypt-rounds`` (4; the production default 12 makes each LOGIN cost about 0.2 s of
server CPU), ``--pool-size`` (the server's database pool, 8 as in production).

The clients are kept cheap on purpose: raw sockets, no imaplib, a minimal response reader,
separate processes for the mix. Their CPU is printed next to the server's, so that a run
where the clients (on the same 2 cores as the server) were the bottleneck can be recognised.

Everything started here (servers, DNS server, client processes, PostgreSQL databases, the
temporary directory) is torn down on exit, Ctrl-C or SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import resource
import signal
import socket
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script: importable from the repository root (mailsuite, tests) and from this
# directory (common), wherever it is started from.
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(path) for path in (BENCH.parents[1], BENCH) if str(path) not in sys.path]

import common  # noqa: E402

from mailsuite.passwords import hash_password  # noqa: E402
from mailsuite.store import Delivery  # noqa: E402
from mailsuite.structure import imap_structure  # noqa: E402
from tests.dnsserver import DNSServerHandle  # noqa: E402
from tests.harness import Mailsuite  # noqa: E402

DOMAIN = "imap-bench.test"
PASSWORD = "bench-password"
SENDER = "bench@sender.test"
CAPS = {"max_connections_per_ip": 5000, "max_connections_per_account": 5000}
# Fixed-width marker in the template's Subject and Message-ID, replaced per message.
MARK = b"QQQQ.QQQQQQQ"
LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}$")
KINDS = ["LOGIN", "SELECT", "FETCH FLAGS", "FETCH ENVELOPE", "FETCH BODY[]", "STORE",
         "APPEND", "SEARCH header", "SEARCH flags", "EXPUNGE", "LOGOUT"]


# ------------------------------------------------------------------------------ messages


def make_body(size: int, seed: int = 3501) -> bytes:
    """About `size` bytes of text in CRLF lines of at most 78 octets."""
    return common.text_body(size, seed)


def tag_of(account: int, seq: int) -> bytes:
    """The 12 octets that replace MARK: account and sequence number."""
    return b"%04d.%07d" % (account, seq)


class Template:
    """One message and its IMAP structure, with MARK in Subject and Message-ID."""

    def __init__(self, size: int) -> None:
        head = (b"From: Bench Sender <" + SENDER.encode() + b">\r\n"
                b"To: Bench Reader <reader@" + DOMAIN.encode() + b">\r\n"
                b"Subject: Bench message " + MARK + b"\r\n"
                b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
                b"Message-ID: <bench." + MARK + b"@sender.test>\r\n"
                b"MIME-Version: 1.0\r\n"
                b"Content-Type: text/plain; charset=us-ascii\r\n"
                b"\r\n")
        self.raw = head + make_body(max(64, size - len(head)))
        self.structure = imap_structure(self.raw)
        if MARK not in self.structure[0]:
            raise RuntimeError("the template's ENVELOPE does not contain the marker")

    def make(self, account: int, seq: int) -> tuple[bytes, tuple[bytes, bytes, bytes]]:
        tag = tag_of(account, seq)
        envelope, bodystructure, body = self.structure
        return self.raw.replace(MARK, tag), (envelope.replace(MARK, tag), bodystructure, body)

    @staticmethod
    def subject(account: int, seq: int) -> str:
        return "Bench message " + tag_of(account, seq).decode()


def analyze(server: Mailsuite) -> float:
    """ANALYZE after a bulk fill, as autovacuum would soon do; the seconds it took.

    Right after a bulk load PostgreSQL has no statistics for the new rows and plans the
    store's `uid IN (...)` lookups as a scan of the whole mailbox (about 100 times slower on
    100,000 messages), which is not the steady state a real mailbox is in.
    """
    from sqlalchemy import text

    start = time.monotonic()
    with server.store.db.engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()
    return time.monotonic() - start


def fill_inbox(server: Mailsuite, account_id: int, account: int, count: int, template: Template,
               batch: int, progress: Callable[[int], None] | None = None) -> float:
    """Deliver `count` messages through the store; the seconds it took."""

    def make(seq: int) -> Delivery:
        raw, structure = template.make(account, seq)
        return Delivery(raw, (account_id,), structure=structure)

    return common.deliver_in_batches(server, count, batch, make, progress)[1]


# ------------------------------------------------------------------------ the IMAP client


class IMAPFailure(Exception):
    pass


class Client:
    """A blocking IMAP client that does as little per response as possible.

    Responses come back with their literals inlined (line, literal, rest of the line, without
    the CRLFs that frame the literal). EXISTS and EXPUNGE responses keep `exists` current.
    """

    #: acknowledge every segment at once (TCP_QUICKACK before each read); see --quickack
    quickack = False

    def __init__(self, host: str, port: int, timeout: float = 600.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.pos = 0
        self.tags = 0
        self.exists = 0
        greeting = self.read_response()
        if not greeting.startswith(b"* OK"):
            raise IMAPFailure(f"greeting: {greeting[:200]!r}")

    def _more(self) -> None:
        if self.quickack:  # Linux re-arms delayed ACKs by itself: set it before every read
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = self.sock.recv(262144)
        if not chunk:
            raise IMAPFailure("connection closed by the server")
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = self.buf[self.pos:end]
                self.pos = end + 2
                return line
            self._more()

    def _exactly(self, size: int) -> bytes:
        while len(self.buf) - self.pos < size:
            self._more()
        data = self.buf[self.pos:self.pos + size]
        self.pos += size
        return data

    def read_response(self) -> bytes:
        line = self._line()
        if not line.endswith(b"}"):
            return line
        parts = []
        while True:
            match = LITERAL_AT_END.search(line)
            if match is None:
                parts.append(line)
                return b"".join(parts)
            parts += [line, self._exactly(int(match.group(1)))]
            line = self._line()

    def command(self, text: bytes, literal: bytes | None = None) -> tuple[bytes, list[bytes]]:
        """(the tagged status and text, the untagged responses)."""
        self.tags += 1
        tag = b"b%d" % self.tags
        if literal is None:
            self.sock.sendall(tag + b" " + text + b"\r\n")
        else:  # LITERAL+: no round trip for the continuation
            self.sock.sendall(b"%s %s {%d+}\r\n%s\r\n" % (tag, text, len(literal), literal))
        untagged = []
        prefix = tag + b" "
        while True:
            response = self.read_response()
            if response.startswith(prefix):
                return response[len(prefix):], untagged
            if response.startswith(b"* "):
                parts = response.split(b" ", 3)
                if len(parts) > 2 and parts[1].isdigit():
                    if parts[2] == b"EXISTS":
                        self.exists = int(parts[1])
                    elif parts[2] == b"EXPUNGE":
                        self.exists -= 1
                untagged.append(response)
            else:
                raise IMAPFailure(f"unexpected response to {text[:40]!r}: {response[:200]!r}")

    def ok(self, text: bytes, literal: bytes | None = None) -> tuple[bytes, list[bytes]]:
        status, untagged = self.command(text, literal)
        if not status.startswith(b"OK"):
            raise IMAPFailure(f"{text[:60]!r}: {status[:300]!r}")
        return status, untagged

    def login(self, address: str) -> None:
        self.ok(b'LOGIN "%s" "%s"' % (address.encode(), PASSWORD.encode()))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ------------------------------------------------------------------------------- measuring


def mib(kib: int | None) -> str:
    return f"{kib / 1024:.1f} MiB" if kib is not None else "n/a"


class Meter:
    """CPU of the server, of PostgreSQL and of this process and its children over a span."""

    def __init__(self, pid: int, postgres: common.PostgresCPU | None) -> None:
        self.pid = pid
        self.postgres = postgres

    def __enter__(self) -> Meter:
        self.server0 = common.proc_cpu_seconds(self.pid) or 0.0
        self.own0 = common.own_cpu_seconds()
        self.children0 = common.children_cpu_seconds()
        if self.postgres is not None:
            self.postgres.begin()
        self.host0 = common.host_busy_seconds()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.monotonic() - self.t0
        self.server = (common.proc_cpu_seconds(self.pid) or 0.0) - self.server0
        self.client = (common.own_cpu_seconds() - self.own0
                       + common.children_cpu_seconds() - self.children0)
        self.pg = self.postgres.end() if self.postgres is not None else None
        self.host = common.host_busy_seconds() - self.host0

    def line(self) -> str:
        def share(cpu: float | None) -> str:
            return common.format_cpu(cpu, self.seconds, core="a core")

        text = f"server {share(self.server)}, clients {share(self.client)}"
        if self.postgres is not None:
            text += f", PostgreSQL {share(self.pg)}"
        others = self.host - self.server - self.client - (self.pg or 0.0)
        text += (f"; host busy {100 * self.host / self.seconds / (os.cpu_count() or 1):.0f}% of "
                 f"{os.cpu_count()} CPUs, {share(max(0.0, others))} by other processes")
        return text


def server_log_problems(server: Mailsuite) -> list[str]:
    """Lines of the server's log that report failures (tracebacks, errors, criticals)."""
    problems = []
    for line in server.log().splitlines():
        if ("#critical]" in line or "#error]" in line or "Traceback" in line
                or "Unhandled" in line or "SERVERBUG" in line):
            problems.append(line)
    return problems


# ------------------------------------------------------------------------------ setup


@dataclass
class Env:
    """A started server on a fresh database, for one scenario."""

    server: Mailsuite
    pid: int
    postgres: common.PostgresCPU | None
    addresses: list[str] = field(default_factory=list)
    account_ids: list[int] = field(default_factory=list)

    def meter(self) -> Meter:
        return Meter(self.pid, self.postgres)


@contextlib.contextmanager
def environment(backend: str, scenario: str, args: argparse.Namespace, dns: DNSServerHandle,
                workroot: Path) -> Iterator[Env]:
    workdir = workroot / f"{backend}-{scenario}"
    overrides = {
        "auth": {"allow_plaintext": True, "bcrypt_rounds": args.bcrypt_rounds},
        "database": {"pool_size": args.pool_size},
        "imap": dict(CAPS),
    }
    with contextlib.ExitStack() as stack:
        db_url, postgres = stack.enter_context(
            common.backend_database(backend, workdir, args.pg_url))
        server = stack.enter_context(common.running_server(workdir, db_url, dns, overrides))
        assert server.process is not None
        server.store.domain_add(DOMAIN)
        yield Env(server, server.process.pid, postgres)


def add_accounts(env: Env, count: int, bcrypt_rounds: int) -> None:
    hashed = hash_password(PASSWORD, rounds=bcrypt_rounds)  # one hash, every account
    for index in range(count):
        address = f"reader{index:05d}@{DOMAIN}"
        env.account_ids.append(env.server.store.account_add(address, hashed))
        env.addresses.append(address)


def block(title: str, rows: list[tuple[str, str]]) -> str:
    # Wider than the SMTP and POP3 blocks: the mix rows carry a rate and two latencies.
    return common.format_block(title, rows, width=78)


# ------------------------------------------------------------------------------------ mix


def mix_worker(host: str, port: int, address: str, account: int, mailbox: int, shared: bool,
               seconds: float, relogin_every: int, appended: bytes, seed: int, quickack: bool,
               barrier: Any, results: Any, index: int) -> None:
    """One client: LOGIN, then rounds of the mix until `seconds` have passed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; no tracebacks
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    Client.quickack = quickack
    rng = random.Random(seed)
    latencies: dict[str, array] = {kind: array("d") for kind in KINDS}
    errors: list[str] = []
    error_count = 0
    clock = time.perf_counter
    rounds = 0
    client: Client | None = None

    def run(kind: str, text: bytes, literal: bytes | None = None,
            ) -> tuple[bytes, list[bytes]] | None:
        nonlocal error_count
        assert client is not None
        start = clock()
        status, untagged = client.command(text, literal)
        latencies[kind].append(clock() - start)
        if not status.startswith(b"OK"):
            error_count += 1
            if len(errors) < 20:
                errors.append(f"{kind}: {text[:60]!r} -> {status[:200]!r}")
            return None
        return status, untagged

    def check(ok: bool, what: str) -> None:
        nonlocal error_count
        if not ok:
            error_count += 1
            if len(errors) < 20:
                errors.append(what)

    try:
        client = Client(host, port)
        barrier.wait(timeout=300)
        deadline = clock() + seconds
        run("LOGIN", b'LOGIN "%s" "%s"' % (address.encode(), PASSWORD.encode()))
        while clock() < deadline:
            answer = run("SELECT", b"SELECT INBOX")
            if answer and not shared:
                check(client.exists == mailbox, f"SELECT: {client.exists} EXISTS, "
                                                f"expected {mailbox}")
            exists = client.exists
            if exists < 2:
                check(False, f"mailbox has {exists} messages")
                break
            answer = run("FETCH FLAGS", b"UID FETCH 1:* (FLAGS)")
            if answer:
                fetched = sum(1 for r in answer[1] if b" FETCH (" in r)
                check(fetched == client.exists,
                      f"UID FETCH 1:* (FLAGS): {fetched} responses, {client.exists} EXISTS")
            low = max(1, exists - 19)
            answer = run("FETCH ENVELOPE",
                         b"FETCH %d:%d (UID RFC822.SIZE ENVELOPE)" % (low, exists))
            if answer:
                fetched = sum(1 for r in answer[1] if b"ENVELOPE (" in r)
                check(fetched == exists - low + 1 or shared,
                      f"FETCH ENVELOPE: {fetched} responses for {exists - low + 1}")
            for _ in range(3):
                answer = run("FETCH BODY[]", b"FETCH %d BODY[]" % rng.randint(1, client.exists))
                if answer:
                    check(any(b"BODY[]" in r for r in answer[1]), "FETCH BODY[]: no BODY[]")
            run("STORE", b"STORE %d +FLAGS (\\Flagged)" % rng.randint(1, client.exists))
            run("STORE", b"STORE %d -FLAGS (\\Seen)" % rng.randint(1, client.exists))
            seq = 1_000_000 + index * 10_000 + rounds % 10_000
            message = appended.replace(MARK, tag_of(account, seq))
            answer = run("APPEND", b"APPEND INBOX (\\Seen)", message)
            uid = None
            if answer:
                found = re.search(rb"\[APPENDUID \d+ (\d+)\]", answer[0])
                check(found is not None, f"APPEND: no APPENDUID in {answer[0][:100]!r}")
                uid = int(found.group(1)) if found else None
            if rounds % 2 == 0:
                subject = Template.subject(account, seq).encode()
                answer = run("SEARCH header", b'UID SEARCH SUBJECT "%s"' % subject)
                if answer and uid is not None:
                    hits = [line for line in answer[1] if line.startswith(b"* SEARCH")]
                    check(hits == [b"* SEARCH %d" % uid],
                          f"SEARCH SUBJECT: {hits!r}, expected UID {uid}")
            else:
                run("SEARCH flags", b"SEARCH UNSEEN")
            before = client.exists
            run("STORE", b"STORE 1 +FLAGS.SILENT (\\Deleted)")
            answer = run("EXPUNGE", b"EXPUNGE")
            if answer and not shared:
                check(client.exists == before - 1,
                      f"EXPUNGE: {client.exists} EXISTS afterwards, expected {before - 1}")
            rounds += 1
            if rounds % relogin_every == 0 and clock() < deadline:
                start = clock()
                status, _ = client.command(b"LOGOUT")
                latencies["LOGOUT"].append(clock() - start)
                check(status.startswith(b"OK"), f"LOGOUT: {status[:100]!r}")
                client.close()
                client = Client(host, port)
                run("LOGIN", b'LOGIN "%s" "%s"' % (address.encode(), PASSWORD.encode()))
            if error_count > 200:
                break
        finished = clock()
        with contextlib.suppress(Exception):
            client.command(b"LOGOUT")
        client.close()
        results.put((index, {k: v.tobytes() for k, v in latencies.items()}, errors,
                     error_count, rounds, finished - (deadline - seconds), None))
    except BaseException as exc:  # report everything to the parent
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((index, {}, errors, error_count, rounds, 0.0,
                     f"{type(exc).__name__}: {exc}"))


def run_mix(backend: str, args: argparse.Namespace, dns: DNSServerHandle,
            workroot: Path) -> str:
    template = Template(args.size)
    with environment(backend, "mix", args, dns, workroot) as env:
        add_accounts(env, args.accounts, args.bcrypt_rounds)
        print(f"[{backend}/mix] filling {args.accounts} INBOXes with {args.mailbox} messages "
              "each ...", flush=True)
        fill = 0.0
        for account, account_id in enumerate(env.account_ids):
            fill += fill_inbox(env.server, account_id, account, args.mailbox, template,
                               args.batch)
        if args.analyze:
            analyze(env.server)
        shared = args.clients > args.accounts
        print(f"[{backend}/mix] server pid {env.pid}; {args.clients} clients for "
              f"{args.seconds:.0f} s ...", flush=True)
        host, port = env.server.imap
        outcomes = []
        with common.ClientProcesses(args.clients, "imap-client") as clients:
            for index in range(args.clients):
                account = index % args.accounts
                clients.start(mix_worker, (
                    host, port, env.addresses[account], account, args.mailbox, shared,
                    args.seconds, args.relogin_every, template.raw, 1000 + index,
                    args.quickack))
            clients.wait_for_start(timeout=300)
            with env.meter() as meter:
                for _ in range(args.clients):
                    outcomes.append(clients.next_result())
                clients.join(10)  # reaped, so that their CPU counts (RUSAGE_CHILDREN)
        failures = [f"client {o[0]}: {o[6]}" for o in outcomes if o[6]]
        if failures:
            raise RuntimeError("clients failed:\n  " + "\n  ".join(failures[:10]))
        per_kind: dict[str, list[float]] = {kind: [] for kind in KINDS}
        errors: list[str] = []
        error_count = 0
        rounds = 0
        elapsed = max(o[5] for o in outcomes)
        for _, raw, errs, count, client_rounds, _, _ in outcomes:
            for kind, data in raw.items():
                values = array("d")
                values.frombytes(data)
                per_kind[kind].extend(values)
            errors += errs
            error_count += count
            rounds += client_rounds
        total = sum(len(v) for v in per_kind.values())
        rows = [
            ("setup", f"{args.accounts} accounts x {args.mailbox} messages of "
                      f"{len(template.raw)} bytes (filled in {fill:.1f} s); {args.clients} "
                      f"client processes, {'sharing' if shared else 'one per'} account; "
                      f"re-login every {args.relogin_every} rounds; bcrypt cost "
                      f"{args.bcrypt_rounds}; pool_size {args.pool_size}; client delayed "
                      f"ACKs {'off (--quickack)' if args.quickack else 'on, as usual'}"),
            ("window", f"{elapsed:.1f} s, {rounds} rounds"),
            ("all commands", f"{total / elapsed:8.0f} /s   ({total} commands)"),
        ]
        for kind in KINDS:
            values = sorted(per_kind[kind])
            if not values:
                continue
            rows.append((f"  {kind}", f"{len(values) / elapsed:8.1f} /s   p50 "
                                     f"{common.percentile(values, 50) * 1000:7.1f} ms   p99 "
                                     f"{common.percentile(values, 99) * 1000:7.1f} ms   "
                                     f"({len(values)})"))
        rows += [
            ("CPU", meter.line()),
            ("host", f"{os.cpu_count()} CPUs shared by server, database and clients"),
            ("server RSS", f"{mib(common.proc_status_kib(env.pid, 'VmRSS'))} now, "
                           f"{mib(common.proc_status_kib(env.pid, 'VmHWM'))} peak"),
            ("errors", f"{error_count}" + ("" if not errors else
                                           "\n    " + "\n    ".join(errors[:10]))),
        ]
        problems = server_log_problems(env.server)
        rows.append(("server log", f"{len(problems)} error lines" + (
            "" if not problems else "\n    " + "\n    ".join(problems[:10]))))
        return block(f"IMAP mix: {backend}", rows)


# ---------------------------------------------------------------------------------- large


def run_large(backend: str, args: argparse.Namespace, dns: DNSServerHandle,
              workroot: Path) -> str:
    template = Template(args.large_size)
    count = args.large
    with environment(backend, "large", args, dns, workroot) as env:
        add_accounts(env, 1, args.bcrypt_rounds)
        address = env.addresses[0]
        print(f"[{backend}/large] filling one INBOX with {count} messages through the store "
              "...", flush=True)
        marks = {count * i // 10 for i in range(1, 11)}
        started = time.monotonic()

        def progress(done: int) -> None:
            if any(done >= m for m in list(marks)):
                for m in [m for m in marks if done >= m]:
                    marks.discard(m)
                elapsed = time.monotonic() - started
                print(f"[{backend}/large]   {done} messages in {elapsed:.0f} s "
                      f"({done / elapsed:.0f}/s)", flush=True)

        fill = fill_inbox(env.server, env.account_ids[0], 0, count, template, args.batch,
                          progress)
        analyzed = analyze(env.server) if args.analyze else None
        rss_before = common.proc_status_kib(env.pid, "VmRSS")
        print(f"[{backend}/large] filled in {fill:.1f} s; server pid {env.pid}, "
              f"RSS {mib(rss_before)}; measuring ...", flush=True)
        timings: list[tuple[str, str]] = []

        def timed(what: str, call: Callable[[], Any], note: Callable[[Any], str]) -> Any:
            cpu0 = common.own_cpu_seconds()
            server0 = common.proc_cpu_seconds(env.pid) or 0.0
            start = time.perf_counter()
            result = call()
            seconds = time.perf_counter() - start
            server_cpu = (common.proc_cpu_seconds(env.pid) or 0.0) - server0
            client_cpu = common.own_cpu_seconds() - cpu0
            timings.append((what, f"{seconds * 1000:9.1f} ms  {note(result)}  (server CPU "
                                  f"{server_cpu:.2f} s, client CPU {client_cpu:.2f} s)"))
            return result

        Client.quickack = args.quickack
        client = Client(*env.server.imap)
        try:
            timed("LOGIN", lambda: client.login(address), lambda _: "")
            timed("SELECT INBOX", lambda: client.ok(b"SELECT INBOX"),
                  lambda _: f"{client.exists} EXISTS")
            if client.exists != count:
                raise RuntimeError(f"SELECT: {client.exists} EXISTS, expected {count}")
            flags = timed("UID FETCH 1:* (FLAGS)", lambda: client.ok(b"UID FETCH 1:* (FLAGS)"),
                          lambda r: f"{len(r[1])} responses")
            if sum(1 for r in flags[1] if b" FETCH (" in r) != count:
                raise RuntimeError("UID FETCH 1:* (FLAGS) did not answer for every message")
            del flags
            envelopes = timed("FETCH last 50 ENVELOPE",
                              lambda: client.ok(b"FETCH %d:* (UID ENVELOPE)" % (count - 49)),
                              lambda r: f"{len(r[1])} responses")
            expected = Template.subject(0, count - 1).encode()
            if not any(expected in r for r in envelopes[1]):
                raise RuntimeError("the last ENVELOPE does not carry the last subject")
            middle = count // 2 + 1
            timed("UID FETCH one BODY.PEEK[]",
                  lambda: client.ok(b"UID FETCH %d BODY.PEEK[]" % middle),
                  lambda r: f"{sum(len(x) for x in r[1])} bytes")
            target = random.Random(7).randrange(count)
            subject = Template.subject(0, target).encode()
            hits = timed("UID SEARCH SUBJECT (header)",
                         lambda: client.ok(b'UID SEARCH SUBJECT "%s"' % subject),
                         lambda r: " ".join(x.decode() for x in r[1])[:60])
            if hits[1] != [b"* SEARCH %d" % (target + 1)]:
                raise RuntimeError(f"SEARCH SUBJECT found {hits[1]!r}, expected UID "
                                   f"{target + 1}")
            timed("SEARCH UNSEEN (flags)", lambda: client.ok(b"SEARCH UNSEEN"),
                  lambda r: f"{len(r[1][0].split()) - 2 if r[1] else 0} hits")
            timed("STATUS INBOX", lambda: client.ok(b"STATUS INBOX (MESSAGES UNSEEN UIDNEXT)"),
                  lambda r: r[1][0].decode()[-40:] if r[1] else "")
            timed("SELECT INBOX again", lambda: client.ok(b"SELECT INBOX"),
                  lambda _: f"{client.exists} EXISTS")
            timed("LOGOUT", lambda: client.command(b"LOGOUT"), lambda _: "")
        finally:
            client.close()
        peak = common.proc_status_kib(env.pid, "VmHWM")
        problems = server_log_problems(env.server)
        rows = [
            ("mailbox", f"{count} messages of {len(template.raw)} bytes in one INBOX; client "
                        f"delayed ACKs {'off (--quickack)' if args.quickack else 'on'}"),
            ("fill (store)", f"{fill:.1f} s, {count / fill:.0f} messages/s "
                             f"(deliver_many, batches of {args.batch}), not measured below"),
            ("statistics", f"ANALYZE after the fill ({analyzed:.1f} s), as autovacuum would do"
             if analyzed is not None else "no ANALYZE after the fill (--no-analyze)"),
            *timings,
            ("server RSS", f"{mib(rss_before)} before the client, "
                           f"{mib(common.proc_status_kib(env.pid, 'VmRSS'))} after, "
                           f"{mib(peak)} peak (VmHWM)"),
            ("server log", f"{len(problems)} error lines" + (
                "" if not problems else "\n    " + "\n    ".join(problems[:10]))),
        ]
        return block(f"IMAP large mailbox: {backend}", rows)


# ----------------------------------------------------------------------------------- idle


@dataclass
class Idler:
    address: str
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    exists_times: list[float] = field(default_factory=list)
    other: list[bytes] = field(default_factory=list)
    waiter: asyncio.Future | None = None
    ended: bytes | None = None
    task: asyncio.Task | None = None


async def _tagged(idler: Idler, tag: bytes) -> bytes:
    assert idler.reader is not None
    while True:
        line = await idler.reader.readline()
        if not line:
            raise IMAPFailure(f"{idler.address}: connection closed")
        if line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise IMAPFailure(f"{idler.address}: {line!r}")
            return line


async def start_idler(idler: Idler, host: str, port: int, gate: asyncio.Semaphore) -> None:
    async with gate:
        idler.reader, idler.writer = await asyncio.open_connection(host, port)
        greeting = await idler.reader.readline()
        if not greeting.startswith(b"* OK"):
            raise IMAPFailure(f"greeting {greeting!r}")
        idler.writer.write(b'i1 LOGIN "%s" "%s"\r\n' % (idler.address.encode(),
                                                          PASSWORD.encode()))
        await _tagged(idler, b"i1")
        idler.writer.write(b"i2 SELECT INBOX\r\ni3 IDLE\r\n")
        await _tagged(idler, b"i2")
        line = await idler.reader.readline()
        if not line.startswith(b"+"):
            raise IMAPFailure(f"{idler.address}: IDLE answered {line!r}")
    idler.task = asyncio.create_task(listen(idler))


async def listen(idler: Idler) -> None:
    assert idler.reader is not None
    clock = time.perf_counter
    while True:
        line = await idler.reader.readline()
        now = clock()
        if not line:
            return
        if line.endswith(b" EXISTS\r\n"):
            idler.exists_times.append(now)
            if idler.waiter is not None and not idler.waiter.done():
                idler.waiter.set_result(now)
        elif line.startswith(b"i3 "):
            idler.ended = line
            return
        else:
            idler.other.append(line)


async def smtp_send(host: str, port: int, rcpts: list[str], message: bytes) -> float:
    """One message through the MX; perf_counter() when its final 250 was read."""
    reader, writer = await asyncio.open_connection(host, port)

    async def expect(code: bytes, what: str) -> None:
        while True:
            line = await reader.readline()
            if line[:3] != code:
                raise RuntimeError(f"SMTP {what}: {line!r}")
            if line[3:4] != b"-":
                return

    try:
        await expect(b"220", "greeting")
        writer.write(b"EHLO bench.sender.test\r\n")
        await expect(b"250", "EHLO")
        writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
        await expect(b"250", "MAIL")
        for rcpt in rcpts:
            writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
            await expect(b"250", f"RCPT {rcpt}")
        writer.write(b"DATA\r\n")
        await expect(b"354", "DATA")
        writer.write(message + b".\r\n")
        await expect(b"250", "end of data")
        done = time.perf_counter()
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(Exception):
            await expect(b"221", "QUIT")
        return done
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def idle_async(env: Env, args: argparse.Namespace, template: Template,
                     notes: list[tuple[str, str]]) -> None:
    idlers = [Idler(address) for address in env.addresses]
    host, port = env.server.imap
    gate = asyncio.Semaphore(50)  # the listen backlog is 50
    rss0 = common.proc_status_kib(env.pid, "VmRSS")
    with env.meter() as meter:
        await asyncio.gather(*(start_idler(i, host, port, gate) for i in idlers))
    await asyncio.sleep(2.0)  # let the server settle
    rss1 = common.proc_status_kib(env.pid, "VmRSS")
    per = ((rss1 - rss0) / len(idlers)) if rss0 and rss1 else None
    notes += [
        ("connect", f"{len(idlers)} idlers (LOGIN, SELECT, IDLE) in {meter.seconds:.1f} s; "
                    + meter.line()),
        ("server RSS", f"{mib(rss0)} before, {mib(rss1)} with {len(idlers)} idling "
                       f"({per:.0f} KiB per connection)" if per is not None else "n/a"),
    ]
    rng = random.Random(2177)
    sample = rng.sample(idlers, min(args.idle_samples, len(idlers)))
    mx_host, mx_port = env.server.mx
    loop = asyncio.get_running_loop()
    latencies = []
    expected: dict[str, int] = {}
    idle_cpu0 = common.proc_cpu_seconds(env.pid) or 0.0
    await asyncio.sleep(5.0)
    idle_cpu = (common.proc_cpu_seconds(env.pid) or 0.0) - idle_cpu0
    notes.append(("idle CPU", f"server {idle_cpu / 5 * 100:.1f}% of a core while "
                              f"{len(idlers)} sessions idle"))
    with env.meter() as meter:
        for seq, idler in enumerate(sample):
            idler.waiter = loop.create_future()
            message = template.make(0, 2_000_000 + seq)[0].replace(
                b"reader@" + DOMAIN.encode(), idler.address.encode())
            accepted = await smtp_send(mx_host, mx_port, [idler.address], message)
            try:
                seen = await asyncio.wait_for(idler.waiter, 10.0)
            except TimeoutError:
                raise RuntimeError(f"{idler.address}: no EXISTS within 10 s of the 250") \
                    from None
            latencies.append(seen - accepted)
            expected[idler.address] = expected.get(idler.address, 0) + 1
            await asyncio.sleep(0.02)
    values = sorted(latencies)
    notes.append(("250 -> EXISTS", f"{len(values)} deliveries one at a time: p50 "
                                   f"{common.percentile(values, 50) * 1000:.1f} ms, p95 "
                                   f"{common.percentile(values, 95) * 1000:.1f} ms, max "
                                   f"{values[-1] * 1000:.1f} ms, min "
                                   f"{values[0] * 1000:.1f} ms (below 0: the EXISTS was read "
                                   f"before the 250); {meter.line()}"))
    # One message to many idlers at once: one commit, every mailbox announced together.
    fan = rng.sample(idlers, min(100, len(idlers)))
    for idler in fan:
        idler.waiter = loop.create_future()
    message = template.make(0, 3_000_000)[0]
    accepted = await smtp_send(mx_host, mx_port, [i.address for i in fan], message)
    waiters = [i.waiter for i in fan if i.waiter is not None]
    _, pending = await asyncio.wait(waiters, timeout=10.0)
    if pending:
        raise RuntimeError(f"{len(pending)} of {len(fan)} idlers heard no EXISTS within 10 s "
                           "of the 250")
    seen = [w.result() for w in waiters]
    for idler in fan:
        expected[idler.address] = expected.get(idler.address, 0) + 1
    spread = sorted(t - accepted for t in seen)
    notes.append(("fan-out", f"1 message to {len(fan)} idlers: first EXISTS "
                             f"{spread[0] * 1000:.1f} ms, p50 "
                             f"{common.percentile(spread, 50) * 1000:.1f} ms, last "
                             f"{spread[-1] * 1000:.1f} ms after the 250"))
    await asyncio.sleep(0.5)
    wrong = [i for i in idlers if len(i.exists_times) != expected.get(i.address, 0)]
    notes.append(("stray updates", f"{len(wrong)} idlers heard a different number of EXISTS "
                                   "than they were sent messages" + (
                                       "" if not wrong else
                                       f" (e.g. {wrong[0].address}: "
                                       f"{len(wrong[0].exists_times)} vs "
                                       f"{expected.get(wrong[0].address, 0)})")))
    others = [line for i in idlers for line in i.other if not line.endswith(b" RECENT\r\n")]
    if others:
        notes.append(("other untagged", repr(others[:5])))
    # Done: every idler ends IDLE and logs out.
    for idler in idlers:
        assert idler.writer is not None
        idler.writer.write(b"DONE\r\n")
    await asyncio.wait_for(asyncio.gather(*(i.task for i in idlers if i.task)), 60.0)
    bad = [i for i in idlers if not (i.ended or b"").startswith(b"i3 OK")]
    notes.append(("IDLE ended", f"{len(idlers) - len(bad)}/{len(idlers)} with i3 OK" + (
        "" if not bad else f"; e.g. {bad[0].address}: {bad[0].ended!r}")))
    for idler in idlers:
        assert idler.writer is not None
        idler.writer.write(b"i4 LOGOUT\r\n")
    await asyncio.sleep(0.5)
    for idler in idlers:
        assert idler.writer is not None
        idler.writer.close()


def raise_nofile(wanted: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        raise RuntimeError(f"RLIMIT_NOFILE is {soft} (hard {hard}); {wanted} are needed")
    return f"RLIMIT_NOFILE {soft} here and in the server"


def run_idle(backend: str, args: argparse.Namespace, dns: DNSServerHandle,
             workroot: Path) -> str:
    template = Template(2048)
    limit = raise_nofile(args.idlers + 200)  # inherited by the server started next
    with environment(backend, "idle", args, dns, workroot) as env:
        print(f"[{backend}/idle] creating {args.idlers} accounts ...", flush=True)
        add_accounts(env, args.idlers, args.bcrypt_rounds)
        print(f"[{backend}/idle] server pid {env.pid}; {args.idlers} idlers ...", flush=True)
        notes: list[tuple[str, str]] = [("setup", f"{args.idlers} accounts, one idler each; "
                                                  f"{limit}")]
        asyncio.run(idle_async(env, args, template, notes))
        notes.append(("server RSS peak", mib(common.proc_status_kib(env.pid, "VmHWM"))))
        problems = server_log_problems(env.server)
        notes.append(("server log", f"{len(problems)} error lines" + (
            "" if not problems else "\n    " + "\n    ".join(problems[:10]))))
        return block(f"IMAP IDLE: {backend}", notes)


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="IMAP benchmark of mailsuite (see the module docstring).")
    common.add_backend_argument(parser)
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="length of the mix run; 0 skips it (20)")
    parser.add_argument("--clients", type=int, default=10, metavar="K",
                        help="concurrent clients in the mix (10)")
    parser.add_argument("--accounts", type=int, default=10, metavar="N",
                        help="accounts the mix clients share (10)")
    parser.add_argument("--mailbox", type=int, default=500,
                        help="messages in each mix INBOX (500)")
    parser.add_argument("--size", type=int, default=4096,
                        help="approximate message size in the mix (4096)")
    parser.add_argument("--relogin-every", type=int, default=10, metavar="R",
                        help="LOGOUT and log in again every R rounds (10)")
    parser.add_argument("--large", type=int, default=0, metavar="N",
                        help="messages in the large-mailbox run; 0 skips it (0)")
    parser.add_argument("--large-size", type=int, default=2048,
                        help="approximate message size in the large mailbox (2048)")
    parser.add_argument("--batch", type=int, default=1000,
                        help="deliveries per store transaction while filling (1000)")
    parser.add_argument("--idlers", type=int, default=0, metavar="K",
                        help="idling connections in the IDLE run; 0 skips it (0)")
    parser.add_argument("--idle-samples", type=int, default=100,
                        help="deliveries timed one by one in the IDLE run (100)")
    parser.add_argument("--quickack", action="store_true",
                        help="clients acknowledge at once (TCP_QUICKACK), which hides the "
                             "~40 ms stall a server without TCP_NODELAY causes when it writes "
                             "a command's answer in two pieces (off)")
    parser.add_argument("--no-analyze", dest="analyze", action="store_false",
                        help="skip the ANALYZE after filling (see analyze())")
    parser.add_argument("--bcrypt-rounds", type=int, default=4,
                        help="bcrypt cost of the accounts' passwords (4)")
    parser.add_argument("--pool-size", type=int, default=8,
                        help="the server's [database] pool_size (8)")
    common.add_pg_url_argument(parser, several=True)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.accounts < 1 or args.relogin_every < 1 or args.batch < 1:
        parser.error("--clients, --accounts, --relogin-every and --batch must be positive")
    if args.clients > 800:
        parser.error("--clients is limited to 800")
    if args.mailbox < 30:
        parser.error("--mailbox must be at least 30")
    if args.large and args.large < 100:
        parser.error("--large must be 0 or at least 100")
    if max(args.mailbox, args.large) > 999_999:
        parser.error("mailboxes are limited to 999999 messages")
    if not 4 <= args.bcrypt_rounds <= 31:
        parser.error("--bcrypt-rounds must be between 4 and 31")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = common.backends_of(args.backend)
    common.prepare_run()
    load = os.getloadavg()[0]
    print(f"host: {os.cpu_count()} CPUs, load average {load:.2f} before the run; the clients "
          "run on the same CPUs as the server (their CPU is shown with each result)",
          flush=True)
    scenarios = []
    if args.seconds > 0:
        scenarios.append(run_mix)
    if args.large:
        scenarios.append(run_large)
    if args.idlers:
        scenarios.append(run_idle)

    def work(dns: DNSServerHandle, workroot: Path) -> None:
        for backend in backends:
            for scenario in scenarios:
                print(scenario(backend, args, dns, workroot), flush=True)

    # No DNS records: the server wants a resolver, not any particular answer.
    failed = common.run_benchmark("mailsuite-imap-bench-", {"records": {}}, work,
                                  name_exception_type=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
