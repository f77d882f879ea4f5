"""Outbound queue benchmark: authenticated submission, DKIM signing, delivery to remote MXs.

Usage (from the repository root)::

    .venv/bin/python scripts/bench/queue_load.py --backend postgresql
    .venv/bin/python scripts/bench/queue_load.py --backend sqlite --messages 200
    .venv/bin/python scripts/bench/queue_load.py --backend both --connections 20 --per-domain 5
    .venv/bin/python scripts/bench/queue_load.py --backend postgresql --processes 2

What it does, per backend:

* starts a loopback DNS server (tests/dnsserver.py) in which the three remote domains
  ``r1.bench.test``, ``r2.bench.test`` and ``r3.bench.test`` have one MX each,
  ``sink1.bench.test`` .. ``sink3.bench.test``, with A records 127.0.0.2, .3 and .4;
* starts three sink processes, one per address, all on one port: minimal asyncio SMTP
  servers (not tests/smtpsink.py, which is thread-per-connection and records everything)
  that advertise PIPELINING, 8BITMIME, SMTPUTF8 and SIZE, take pipelined MAIL/RCPT/DATA,
  answer 250 to everything and count what they accept in shared memory;
* starts the real server (``twistd -n mailsuite`` through tests/harness.Mailsuite) on a fresh
  database (a temporary SQLite file, or a throwaway PostgreSQL database
  ``mailsuite_bench_<hex>`` created through ``--pg-url`` and dropped afterwards) with
  greeting_delay 0, ``[auth] allow_plaintext = true`` (the clients AUTH PLAIN over plain TCP
  on loopback), and ``[delivery] port`` = the sinks' port, ``poll_interval = 0.2``,
  ``max_connections_per_domain = --per-domain``; with ``--processes P`` > 1 (PostgreSQL
  only), P such processes with ``[server] reuse_port`` on the same ports, each with its own
  work directory and log: every one accepts submissions (the kernel spreads the connections
  across them) and delivers from the shared queue (FOR UPDATE SKIP LOCKED claims), so
  ``max_connections_per_domain`` holds per process;
* creates one domain with a DKIM key (so every message is signed as real mail is) and one
  account in it;
* runs ``--connections`` client processes, each with one smtplib connection to the
  submission port: EHLO and AUTH once, then its share of ``--messages`` messages of about
  ``--size`` bytes, From the account, To bench@ each of the three remote domains, each with
  its own Message-ID and ``X-Bench-Seq`` header;
* waits until the sinks have accepted every recipient (``--messages`` x 3), checks that each
  domain got each message exactly once, DKIM-signed, verifies one sample's signature, and
  that the queue is empty (``Store.queue_size() == 0``) and the logs (of every server
  process, rotated files included) report every recipient delivered;
* prints the submission rate (messages/s from the first MAIL to the last 250) and its
  p50/p99 latency (MAIL FROM sent -> 250 after end-of-data, smtplib's sendmail), the time
  from the first submission until the sinks held every recipient and the delivery rate
  (recipients/s over that time), the delivery connections the sinks saw, CPU used by the
  server (summed over its processes), PostgreSQL, the sinks and the clients, and the
  server's peak RSS (VmHWM; with several processes the largest, and each one's), and with
  several processes how many recipients each one delivered (from its log).

Options: ``--backend sqlite|postgresql|both`` (default both), ``--messages`` (5000),
``--connections`` (10), ``--size`` (4096), ``--per-domain`` ([delivery]
max_connections_per_domain, per process, 10), ``--processes`` (server processes sharing
the ports and the queue, PostgreSQL only, 1), ``--no-dkim`` (no key for the sender domain,
so nothing is signed: the queue without the cost of signing), ``--timeout`` (give up when
no recipient has been delivered for that many seconds, 120), ``--pg-url`` (default
$MAILSUITE_TEST_PG_URL or postgresql://postgres@127.0.0.1:5432/postgres).

Everything started here (server processes, DNS server, sinks, client processes, the
PostgreSQL database, the temporary directory) is torn down on exit, Ctrl-C or SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import queue
import secrets
import signal
import smtplib
import socket
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

# Run as a script: importable from the repository root (mailsuite, tests) and from this
# directory (common), wherever it is started from.
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(path) for path in (BENCH.parents[1], BENCH) if str(path) not in sys.path]

import common  # noqa: E402
import dkim as dkimpy  # noqa: E402

from mailsuite import dkim  # noqa: E402
from tests.dnsserver import DNSServerHandle  # noqa: E402
from tests.harness import Mailsuite  # noqa: E402
from tests.smtpsink import free_port_on  # noqa: E402

PASSWORD = "bench password"
HELO = "client.bench.test"
# (remote domain, its MX host, the MX host's address): one sink per address.
REMOTES = [(f"r{n}.bench.test", f"sink{n}.bench.test", f"127.0.0.{n + 1}") for n in (1, 2, 3)]
RECIPIENTS = [f"bench@{domain}" for domain, _, _ in REMOTES]
SINK_ADDRESSES = [address for _, _, address in REMOTES]


def remote_zones() -> dict[str, Any]:
    records: dict[str, list[dict[str, str]]] = {}
    for domain, host, address in REMOTES:
        records[domain] = [{"type": "MX", "value": f"10 {host}"}]
        records[host] = [{"type": "A", "value": address}]
    return {"records": records}


# ------------------------------------------------------------------------------ messages


class Template:
    """The messages: the same body for all, headers that differ by sequence number."""

    def __init__(self, sender: str, size: int) -> None:
        self.sender = sender
        self.token = secrets.token_hex(6)
        self.domain = sender.rpartition("@")[2]
        overhead = len(self.header(0))
        self.body = common.text_body(max(3, size - overhead), 4096) or b"x\r\n"

    def header(self, seq: int) -> bytes:
        return (f"From: Bench <{self.sender}>\r\n"
                f"To: {', '.join(f'<{rcpt}>' for rcpt in RECIPIENTS)}\r\n"
                f"Subject: mailsuite queue benchmark {seq}\r\n"
                "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
                f"Message-ID: <bench.{seq:06d}.{self.token}@{self.domain}>\r\n"
                f"{common.SEQ_HEADER.decode()}: {seq:06d}\r\n"
                "MIME-Version: 1.0\r\n"
                "Content-Type: text/plain; charset=us-ascii\r\n"
                "\r\n").encode("ascii")

    def message(self, seq: int) -> bytes:
        return self.header(seq) + self.body


# ---------------------------------------------------------------------------------- sinks

# Slots of a sink's counters (one RawArray of 64-bit integers per sink, written only by it).
RCPTS, MESSAGES, SIGNED, UNKNOWN, CONNECTIONS, ACTIVE, PEAK, BYTES = range(8)
FIRST, LAST = range(2)  # slots of its RawArray of times (time.monotonic(), system-wide)
SINK_EHLO = (b"250-%s\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
             b"250 SIZE 104857600\r\n")
SEQ_MARK = b"\n" + common.SEQ_HEADER + b": "


class SinkState:
    """What one sink process counts, in memory shared with the parent."""

    def __init__(self, counts: Any, times: Any, seen: Any, status: Any, index: int) -> None:
        self.counts = counts
        self.times = times
        self.seen = seen
        self.status = status
        self.index = index
        self.sampled = False

    def accept(self, message: bytes, rcpts: int) -> None:
        """A whole message (still dot-stuffed; ours has no line starting with a dot)."""
        counts, times = self.counts, self.times
        now = time.monotonic()
        if not counts[MESSAGES]:
            times[FIRST] = now
        counts[MESSAGES] += 1
        counts[BYTES] += len(message)
        head = message[:message.find(b"\r\n\r\n") + 2]
        if b"\nDKIM-Signature:" in head or head.startswith(b"DKIM-Signature:"):
            counts[SIGNED] += 1
        mark = head.find(SEQ_MARK)
        seq = int(head[mark + len(SEQ_MARK):mark + len(SEQ_MARK) + 6]) if mark >= 0 else -1
        if 0 <= seq < len(self.seen):
            if self.seen[seq] < 255:
                self.seen[seq] += 1
        else:
            counts[UNKNOWN] += 1
        if not self.sampled:  # one message for the parent to verify its DKIM signature
            self.sampled = True
            self.status.put(("sample", self.index, message))
        counts[RCPTS] += rcpts
        times[LAST] = now


class SinkProtocol(asyncio.Protocol):
    """Just enough ESMTP for a delivering client: every command answered at once, in order."""

    def __init__(self, state: SinkState, greeting: bytes, ehlo: bytes) -> None:
        self.state = state
        self.greeting = greeting
        self.ehlo = ehlo
        self.buf = bytearray()
        self.in_data = False
        self.scan = 0
        self.rcpts = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                          socket.TCP_NODELAY, 1)
        counts = self.state.counts
        counts[CONNECTIONS] += 1
        counts[ACTIVE] += 1
        counts[PEAK] = max(counts[PEAK], counts[ACTIVE])
        transport.write(self.greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.counts[ACTIVE] -= 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        close = False
        while buf:
            if self.in_data:
                # The buffer starts with the CRLF of the DATA line, so an empty message's
                # ".\r\n" is found as "\r\n.\r\n" too.
                end = buf.find(b"\r\n.\r\n", self.scan)
                if end < 0:
                    self.scan = max(0, len(buf) - 4)
                    break
                self.state.accept(bytes(buf[2:end + 2]), self.rcpts)
                del buf[:end + 5]
                self.in_data, self.scan, self.rcpts = False, 0, 0
                out.append(b"250 2.0.0 Ok: accepted\r\n")
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 4096:
                    out.append(b"500 5.5.2 Line too long\r\n")
                    close = True
                break
            verb = bytes(buf[:4]).upper()
            if verb == b"DATA":
                del buf[:end]  # keep the CRLF: see above
                if self.rcpts:
                    self.in_data = True
                    out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                else:
                    del buf[:2]
                    out.append(b"554 5.5.1 No valid recipients\r\n")
                continue
            del buf[:end + 2]
            if verb == b"RCPT":
                self.rcpts += 1
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"MAIL":
                self.rcpts = 0
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"EHLO":
                out.append(self.ehlo)
            elif verb in (b"HELO", b"NOOP"):
                out.append(b"250 Ok\r\n")
            elif verb == b"RSET":
                self.rcpts = 0
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                close = True
                break
            else:
                out.append(b"502 5.5.2 Command not implemented\r\n")
        if out:
            self.transport.write(b"".join(out))
        if close:
            buf.clear()
            self.transport.close()


def sink_main(index: int, host: str, port: int, name: str, counts: Any, times: Any,
              seen: Any, status: Any) -> None:
    """One sink process: serve SMTP on host:port until terminated."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; no tracebacks
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    state = SinkState(counts, times, seen, status, index)
    greeting = f"220 {name} ESMTP bench sink\r\n".encode()
    ehlo = SINK_EHLO % name.encode()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(loop.create_server(
            lambda: SinkProtocol(state, greeting, ehlo), host, port, reuse_address=True,
            backlog=512))
    except BaseException as exc:
        status.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    status.put(("ready", index, None))
    loop.run_forever()


class Sinks:
    """The three sink processes and their shared counters; a context manager."""

    def __init__(self, port: int, messages: int) -> None:
        ctx = mp.get_context("fork")
        self.port = port
        self.status = ctx.Queue()
        self.counts = [ctx.RawArray("q", 8) for _ in REMOTES]
        self.times = [ctx.RawArray("d", 2) for _ in REMOTES]
        self.seen = [ctx.RawArray("B", messages) for _ in REMOTES]
        self.samples: list[bytes] = []
        self.procs: list[BaseProcess] = [
            ctx.Process(target=sink_main, name=f"bench-sink-{index}", daemon=True,
                        args=(index, address, port, host, self.counts[index],
                              self.times[index], self.seen[index], self.status))
            for index, (_, host, address) in enumerate(REMOTES)]

    def __enter__(self) -> Sinks:
        try:
            for proc in self.procs:
                proc.start()
            ready = 0
            deadline = time.monotonic() + 30
            while ready < len(self.procs):
                kind, index, detail = self.status.get(timeout=max(0.1, deadline - time.monotonic()))
                if kind == "error":
                    raise RuntimeError(f"sink {SINK_ADDRESSES[index]}:{self.port}: {detail}")
                ready += kind == "ready"
        except queue.Empty:
            self.__exit__()
            raise RuntimeError("the sinks did not start in 30 s") from None
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5)

    def total(self, slot: int) -> int:
        return sum(counts[slot] for counts in self.counts)

    def cpu_seconds(self) -> float | None:
        values = [common.proc_cpu_seconds(proc.pid) for proc in self.procs if proc.pid]
        return None if None in values else sum(v for v in values if v is not None)

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.is_alive():
                raise RuntimeError(f"sink {proc.name} died with exit code {proc.exitcode}")

    def last_accept(self) -> float:
        return max(times[LAST] for times in self.times)

    def collect_samples(self) -> list[bytes]:
        with contextlib.suppress(queue.Empty):
            while True:
                kind, _, detail = self.status.get_nowait()
                if kind == "sample":
                    self.samples.append(detail)
        return self.samples

    def per_domain_check(self) -> list[str]:
        """Problems with what each domain got: missing or repeated messages."""
        problems = []
        for (domain, _, _), seen in zip(REMOTES, self.seen, strict=True):
            got = bytes(seen)
            missing = got.count(0)
            repeated = len(got) - missing - got.count(1)
            if missing or repeated:
                problems.append(f"{domain}: {missing} messages missing, {repeated} received "
                                "more than once")
        return problems


# -------------------------------------------------------------------------------- client


def client_worker(host: str, port: int, user: str, password: str, seqs: range,
                  template: Template, barrier: Any, results: Any, index: int) -> None:
    """One connection: EHLO, AUTH, wait for the start, send every message of `seqs`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; no tracebacks
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        smtp = smtplib.SMTP(host, port, local_hostname=HELO, timeout=120)
        smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        smtp.ehlo()
        smtp.login(user, password)  # AUTH PLAIN, which smtplib prefers to LOGIN
        messages = [template.message(seq) for seq in seqs]  # built before the clock starts
        latencies = array("d")
        clock = time.perf_counter
        barrier.wait(timeout=120)
        for message in messages:
            start = clock()
            refused = smtp.sendmail(user, RECIPIENTS, message)
            latencies.append(clock() - start)
            if refused:
                raise RuntimeError(f"recipients refused: {refused}")
        finished = time.monotonic()
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        smtp.close()
        results.put((index, latencies.tobytes(), finished, None))
    except BaseException as exc:  # report everything to the parent, then stop the others
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((index, b"", 0.0, f"{type(exc).__name__}: {exc}"))


def run_clients(server: Mailsuite, user: str, template: Template, args: argparse.Namespace,
                on_start: Callable[[], float]) -> tuple[float, float, list[float], float]:
    """(start, end of the last submission (time.monotonic()), latencies, client CPU)."""
    conns = args.connections
    host, port = server.submission
    cpu_before = common.children_cpu_seconds()
    with common.ClientProcesses(conns, "bench-client") as clients:
        for index in range(conns):
            seqs = range(index, args.messages, conns)  # distinct seqs, shares differ by <= 1
            clients.start(client_worker, (host, port, user, PASSWORD, seqs, template))
        clients.wait_for_start(timeout=120)
        started = on_start()
        finished, latencies = clients.collect_latencies(started)
        clients.join(10)
        return started, finished, latencies, common.children_cpu_seconds() - cpu_before


# ----------------------------------------------------------------------------- measuring


class CPUSample:
    """Server, PostgreSQL and host CPU at one moment (the PostgreSQL figure since begin())."""

    def __init__(self, pids: list[int], postgres: common.PostgresCPU | None,
                 sinks: Sinks, begin: bool = False) -> None:
        self.at = time.monotonic()
        values = [common.proc_cpu_seconds(pid) for pid in pids]
        self.server = None if None in values else sum(v for v in values if v is not None)
        self.sinks = sinks.cpu_seconds()
        self.host = common.host_cpu_jiffies()
        self.postgres: float | None = None
        if postgres is not None:
            if begin:
                postgres.begin()
            else:
                self.postgres = postgres.end()

    def server_since(self, start: CPUSample) -> float | None:
        if self.server is None or start.server is None:
            return None
        return self.server - start.server

    def sinks_since(self, start: CPUSample) -> float | None:
        if self.sinks is None or start.sinks is None:
            return None
        return self.sinks - start.sinks

    def host_busy_since(self, start: CPUSample) -> float | None:
        busy0, total0 = start.host
        busy1, total1 = self.host
        return (busy1 - busy0) / (total1 - total0) if total1 > total0 else None


def wait_for_delivery(servers: list[Mailsuite], sinks: Sinks, wanted: int,
                      stall: float) -> None:
    """Until the sinks have accepted `wanted` recipients; raises if delivery stalls."""
    server = servers[0]
    last_count, last_progress = -1, time.monotonic()
    while True:
        count = sinks.total(RCPTS)
        if count >= wanted:
            return
        now = time.monotonic()
        if count != last_count:
            last_count, last_progress = count, now
        elif now - last_progress > stall:
            raise RuntimeError(f"delivery stalled: the sinks hold {count}/{wanted} recipients "
                               f"and none came in {stall:.0f} s; {queue_report(server)}")
        for index, each in enumerate(servers):
            if each.process is None or each.process.poll() is not None:
                raise RuntimeError("the server exited during delivery" if len(servers) == 1
                                   else f"server process {index} exited during delivery")
        sinks.check_alive()
        time.sleep(0.01)


def queue_report(server: Mailsuite) -> str:
    """The queue's state in a line, for an error message."""
    try:
        entries = server.store.queue_list()
    except Exception as exc:
        return f"the queue could not be read: {exc}"
    states: dict[str, int] = {}
    replies: dict[str, int] = {}
    for entry in entries:
        for _, state, _, _, reply in entry.recipients:
            states[state] = states.get(state, 0) + 1
            if reply:
                replies[reply] = replies.get(reply, 0) + 1
    text = "queue: " + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "empty")
    if replies:
        reply, n = max(replies.items(), key=lambda item: item[1])
        text += f"; most common last reply ({n}x): {reply}"
    return text


def wait_for_empty_queue(server: Mailsuite, timeout: float = 30.0) -> int:
    """The queue's size once it is 0, or after `timeout` (the last outcomes are recorded just
    after the sinks' 250)."""
    deadline = time.monotonic() + timeout
    while True:
        size = server.store.queue_size()
        if size == 0 or time.monotonic() > deadline:
            return size
        time.sleep(0.02)


def server_log_lines(server: Mailsuite) -> Iterator[str]:
    """Every line the server logged, rotated files (twistd.log.N, 1 MB each) included."""
    for path in [*sorted(server.workdir.glob("twistd.log.*")), server.workdir / "twistd.log",
                 server.workdir / "stderr.log"]:
        if path.exists():
            with path.open(encoding="utf-8", errors="replace") as lines:
                yield from lines


def log_outcomes(servers: list[Mailsuite]) -> tuple[dict[str, int], list[str], list[int]]:
    """(delivery outcomes by state, problem lines, recipients each process delivered) from
    the logs of every server process; problem lines name their process when there are
    several."""
    states: dict[str, int] = {}
    problems = []
    delivered = []
    for index, server in enumerate(servers):
        prefix = f"[process {index}] " if len(servers) > 1 else ""
        mine = 0
        for line in server_log_lines(server):
            if "delivery " in line and " status=" in line:
                state = line.split(" status=", 1)[1].split(" ", 1)[0]
                states[state] = states.get(state, 0) + 1
                mine += state == "delivered"
            if ("#critical]" in line or "#error]" in line or "Traceback" in line
                    or "Unhandled" in line or "SERVERBUG" in line):
                problems.append(prefix + line.rstrip("\n"))
        delivered.append(mine)
    return states, problems, delivered


def verify_sample(samples: list[bytes], key: dkim.DKIMKey) -> str:
    """Check one delivered message's DKIM signature against the domain's public key."""
    if not samples:
        raise RuntimeError("no sink kept a sample message")
    record = dkim.public_record(key).encode()
    sample = samples[0]
    if not dkimpy.verify(sample, dnsfunc=lambda name, timeout=5: record):
        raise RuntimeError("a delivered message does not verify against the domain's DKIM key")
    return f"{key.algorithm} s={key.selector} d={key.domain}, sample verified"


# ----------------------------------------------------------------------------------- run


@dataclass
class Result:
    backend: str
    connections: int
    messages: int
    size: int
    submitted_size: int
    delivered_size: float
    per_domain: int
    submit_elapsed: float
    deliver_elapsed: float
    latencies: list[float]
    delivered_at_submit_end: int
    recipients: int
    signed: int
    dkim_note: str
    queue_left: int
    log_states: dict[str, int]
    log_problems: list[str]
    sink_connections: list[int]
    sink_peaks: list[int]
    first_delivery: float
    server_cpu_submit: float | None
    server_cpu: float | None
    cpu_span: float  # seconds from the first submission until the queue was seen empty
    postgres_cpu_submit: float | None
    postgres_cpu: float | None
    sink_cpu: float | None
    client_cpu: float
    host_busy: float | None
    peak_rss_kib: int | None  # the largest over the server processes
    processes: int
    delivered_per_process: list[int]  # recipients with status=delivered in each one's log
    peak_rss_per_process: list[int | None]

    @property
    def rate(self) -> float:
        return self.messages / self.submit_elapsed if self.submit_elapsed > 0 else float("nan")

    @property
    def delivery_rate(self) -> float:
        return (self.recipients / self.deliver_elapsed if self.deliver_elapsed > 0
                else float("nan"))

    def block(self) -> str:
        ms = sorted(v * 1000 for v in self.latencies)
        cores = os.cpu_count() or 1
        wanted = self.messages * len(REMOTES)

        def cpu(seconds: float | None, elapsed: float) -> str:
            return common.format_cpu(seconds, elapsed)

        states = ", ".join(f"{n} {s}" for s, n in sorted(self.log_states.items())) or "none"
        rows = [
            ("backend", self.backend),
            ("connections", f"{self.connections} (AUTH PLAIN over plain TCP on loopback, "
                            "[auth] allow_plaintext = true)"),
        ]
        several = self.processes > 1
        if several:
            rows.append(("server processes",
                         f"{self.processes} ([server] reuse_port on the same ports, one "
                         "queue; CPU and RSS below cover all of them)"))
        rows += [
            ("messages", f"{self.messages} x {len(REMOTES)} recipients on "
                         f"{len(REMOTES)} remote domains = {wanted} recipients"),
            ("size", f"{self.size} bytes requested, {self.submitted_size} submitted, "
                     f"{self.delivered_size:.0f} delivered (with Received"
                     + (" and DKIM-Signature)" if self.signed else ")")),
            ("DKIM", f"{self.signed}/{self.recipients} delivered copies signed; "
                     f"{self.dkim_note}"),
            ("submission elapsed", f"{self.submit_elapsed:.2f} s"),
            ("submission rate", f"{self.rate:.1f} messages/s"),
            ("latency p50", f"{common.percentile(ms, 50):.1f} ms"),
            ("latency p99", f"{common.percentile(ms, 99):.1f} ms"),
            ("latency max", f"{ms[-1]:.1f} ms" if ms else "n/a"),
            ("first delivery", f"{self.first_delivery:.2f} s after the first submission"),
            ("delivered at the end of submission",
             f"{self.delivered_at_submit_end}/{wanted} recipients "
             f"({100 * self.delivered_at_submit_end / wanted:.0f}%)"),
            ("all delivered", f"{self.deliver_elapsed:.2f} s after the first submission "
                              f"({self.deliver_elapsed - self.submit_elapsed:.2f} s after "
                              "the last)"),
            ("delivery rate", f"{self.delivery_rate:.1f} recipients/s"),
            ("queue afterwards", f"{self.queue_left} recipients (Store.queue_size())"),
            ("server logs" if several else "server log",
             f"{states}; {len(self.log_problems)} error lines" + (
                 "" if not self.log_problems else
                 "\n    " + "\n    ".join(self.log_problems[:10]))),
        ]
        if several:
            rows.append(("delivered per process",
                         ", ".join(f"{n} ({100 * n / wanted:.0f}%)"
                                   for n in self.delivered_per_process)
                         + " recipients (status=delivered in each one's log)"))
        limit = (f"limit {self.per_domain} per process, {self.processes * self.per_domain} "
                 f"in all" if several else f"limit {self.per_domain}")
        rows += [
            ("delivery connections",
             f"{sum(self.sink_connections)} ("
             + ", ".join(f"{domain} {n}" for (domain, _, _), n
                         in zip(REMOTES, self.sink_connections, strict=True))
             + f"); at most {max(self.sink_peaks)} at once per domain, "
               f"{limit}; plaintext (no STARTTLS offered)"),
            ("server CPU, submission", cpu(self.server_cpu_submit, self.submit_elapsed)),
            ("server CPU, until delivered", cpu(self.server_cpu, self.cpu_span)),
            ("server CPU/msg", f"{1000 * self.server_cpu / self.messages:.2f} ms"
             if self.server_cpu is not None else "n/a"),
        ]
        if self.backend == "postgresql":
            rows.append(("postgres CPU, submission",
                         cpu(self.postgres_cpu_submit, self.submit_elapsed)))
            rows.append(("postgres CPU, until delivered",
                         cpu(self.postgres_cpu, self.cpu_span)))
        rows.append(("sink CPU (3 processes)", cpu(self.sink_cpu, self.cpu_span)))
        rows.append(("client CPU", cpu(self.client_cpu, self.submit_elapsed)))
        if self.host_busy is not None:
            rows.append(("host CPU busy", f"{100 * self.host_busy:.0f}% of {cores} cores "
                                          "until delivered"))
        rss = f"{self.peak_rss_kib / 1024:.1f} MiB (VmHWM)" if self.peak_rss_kib else "n/a"
        if several and self.peak_rss_kib:
            rss = (f"{self.peak_rss_kib / 1024:.1f} MiB (VmHWM, the largest); per process "
                   + ", ".join(f"{kib / 1024:.1f}" if kib else "n/a"
                               for kib in self.peak_rss_per_process) + " MiB")
        rows.append(("server peak RSS", rss))
        return common.format_block(f"mailsuite queue load: {self.backend}", rows)


def server_overrides(args: argparse.Namespace, sink_port: int) -> dict[str, dict[str, Any]]:
    # No greeting delay and a per-IP cap above --connections: neither is what is measured.
    overrides: dict[str, dict[str, Any]] = {
        "smtp": {"greeting_delay": 0.0,
                 "max_connections_per_ip": max(20, args.connections + 10)},
        "auth": {"allow_plaintext": True},
        "delivery": {"port": sink_port, "poll_interval": 0.2,
                     "max_connections_per_domain": args.per_domain},
    }
    if args.processes > 1:
        overrides["server"] = {"reuse_port": True}  # every process on the same ports
    return overrides


def show_other_logs(others: list[Mailsuite]) -> None:
    """The end of each further server process's log, after a failure."""
    for other in others:
        for path in (other.workdir / "twistd.log", other.workdir / "stderr.log"):
            if path.exists() and path.stat().st_size:
                tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
                print(f"--- last lines of {path}:\n" + "\n".join(tail), file=sys.stderr)


def run_backend(backend: str, args: argparse.Namespace, dns: DNSServerHandle,
                workdir: Path) -> Result:
    wanted = args.messages * len(REMOTES)
    with contextlib.ExitStack() as stack:
        db_url, postgres_cpu = stack.enter_context(
            common.backend_database(backend, workdir, args.pg_url))
        sinks = stack.enter_context(Sinks(free_port_on(SINK_ADDRESSES), args.messages))
        print(f"[{backend}] sinks on port {sinks.port} of {', '.join(SINK_ADDRESSES)}; "
              "starting server ...", flush=True)
        overrides = server_overrides(args, sinks.port)
        server = stack.enter_context(common.running_server(workdir, db_url, dns, overrides))
        assert server.process is not None
        pid = server.process.pid
        servers, pids = [server], [pid]

        def show_logs_on_failure(kind: type[BaseException] | None, *rest: object) -> None:
            if kind is not None and issubclass(kind, Exception):
                show_other_logs(servers[1:])  # run_benchmark() shows only the first one's

        stack.push(show_logs_on_failure)  # runs once the other processes have stopped
        for extra in range(1, args.processes):
            other = Mailsuite(workdir / f"process-{extra}", db_url, dns.address, overrides,
                              ports=server.ports)
            stack.callback(other.stop)
            other.start(timeout=60)  # a failed start raises with its log
            assert other.process is not None
            servers.append(other)
            pids.append(other.process.pid)
        domain = server.new_domain()
        user = server.new_account(domain, PASSWORD)
        key = None
        if not args.no_dkim:
            key = dkim.generate_key(domain)
            server.store.dkim_key_add(domain, key.selector, key.algorithm, key.private_key)
        template = Template(user, args.size)
        pid_text = (f"server pid {pid}" if len(pids) == 1 else
                    f"{len(pids)} server processes (pids {', '.join(map(str, pids))})")
        print(f"[{backend}] {pid_text}, submission on {server.submission[0]}:"
              f"{server.submission[1]}; submitting {args.messages} messages over "
              f"{args.connections} connections as {user} ...", flush=True)

        samples: dict[str, CPUSample] = {}

        def on_start() -> float:
            samples["start"] = CPUSample(pids, postgres_cpu, sinks, begin=True)
            return samples["start"].at

        started, finished, latencies, client_cpu = run_clients(
            server, user, template, args, on_start)
        at_submit_end = sinks.total(RCPTS)
        submitted = CPUSample(pids, postgres_cpu, sinks)
        print(f"[{backend}] submitted in {finished - started:.2f} s; {at_submit_end}/{wanted} "
              "recipients delivered so far; waiting for the rest ...", flush=True)
        wait_for_delivery(servers, sinks, wanted, args.timeout)
        delivered_at = sinks.last_accept()
        queue_left = wait_for_empty_queue(server)
        done = CPUSample(pids, postgres_cpu, sinks)
        start = samples["start"]
        problems = sinks.per_domain_check()
        if sinks.total(RCPTS) != wanted:
            problems.append(f"the sinks accepted {sinks.total(RCPTS)} recipients, "
                            f"expected {wanted}")
        if sinks.total(UNKNOWN):
            problems.append(f"{sinks.total(UNKNOWN)} delivered messages without a known "
                            f"{common.SEQ_HEADER.decode()}")
        if queue_left:
            problems.append(f"{queue_left} recipients still queued; {queue_report(server)}")
        log_states, log_problems, delivered_per_process = log_outcomes(servers)
        if log_states.get("delivered", 0) != wanted:
            logs = "the server log reports" if len(servers) == 1 else (
                f"the logs of the {len(servers)} server processes report")
            problems.append(f"{logs} {log_states or 'no'} delivery outcomes, "
                            f"expected {wanted} delivered")
        if problems:
            raise RuntimeError("; ".join(problems))
        if key is not None:
            if sinks.total(SIGNED) != wanted:
                raise RuntimeError(f"only {sinks.total(SIGNED)}/{wanted} delivered copies "
                                   "carry a DKIM-Signature")
            dkim_note = verify_sample(sinks.collect_samples(), key)
        else:
            dkim_note = "the domain has no key (--no-dkim)"
        first = min(times[FIRST] for times in sinks.times)
        deliver_elapsed = delivered_at - started
        span = done.at - started  # the CPU figures run until the queue was seen empty
        peaks = [common.proc_peak_rss_kib(p) for p in pids]

        return Result(
            backend=backend, connections=args.connections, messages=args.messages,
            size=args.size, submitted_size=len(template.message(0)),
            delivered_size=sinks.total(BYTES) / max(1, sinks.total(MESSAGES)),
            per_domain=args.per_domain, submit_elapsed=finished - started,
            deliver_elapsed=deliver_elapsed, latencies=latencies,
            delivered_at_submit_end=at_submit_end, recipients=sinks.total(RCPTS),
            signed=sinks.total(SIGNED), dkim_note=dkim_note, queue_left=queue_left,
            log_states=log_states, log_problems=log_problems,
            sink_connections=[counts[CONNECTIONS] for counts in sinks.counts],
            sink_peaks=[counts[PEAK] for counts in sinks.counts],
            first_delivery=first - started,
            server_cpu_submit=submitted.server_since(start),
            server_cpu=done.server_since(start), cpu_span=span,
            postgres_cpu_submit=submitted.postgres,
            postgres_cpu=done.postgres, sink_cpu=done.sinks_since(start),
            client_cpu=client_cpu,
            host_busy=done.host_busy_since(start),
            peak_rss_kib=max((kib or 0) for kib in peaks) or None,
            processes=len(servers), delivered_per_process=delivered_per_process,
            peak_rss_per_process=peaks,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Outbound queue benchmark of mailsuite (see the module docstring).")
    common.add_backend_argument(parser)
    parser.add_argument("--messages", type=int, default=5000, metavar="M",
                        help="messages in total, shared among the connections (5000)")
    parser.add_argument("--connections", type=int, default=10, metavar="C",
                        help="concurrent submission connections, one client process each (10)")
    parser.add_argument("--size", type=int, default=4096, metavar="BYTES",
                        help="approximate size of each submitted message (4096)")
    parser.add_argument("--per-domain", type=int, default=10, metavar="N",
                        help="[delivery] max_connections_per_domain, per process (10)")
    parser.add_argument("--processes", type=int, default=1, metavar="P",
                        help="server processes sharing the ports ([server] reuse_port) and "
                             "the queue; PostgreSQL only (default %(default)s)")
    parser.add_argument("--no-dkim", action="store_true",
                        help="give the sender domain no DKIM key, so nothing is signed "
                             "(signing is on by default, as in production)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="give up when no recipient has been delivered for this long (120)")
    common.add_pg_url_argument(parser)
    args = parser.parse_args(argv)
    if min(args.connections, args.messages, args.size, args.per_domain) < 1:
        parser.error("--connections, --messages, --size and --per-domain must be positive")
    if args.messages > 999_999:
        parser.error("--messages is limited to 999999")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.processes < 1:
        parser.error("--processes must be positive")
    if args.processes > 1 and args.backend != "postgresql":
        parser.error(f"--processes {args.processes} needs --backend postgresql (the backend is "
                     f"{args.backend}): several server processes share one queue through "
                     "PostgreSQL; SQLite is one process by design")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = common.backends_of(args.backend)
    common.prepare_run()
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before the run; "
          "clients, sinks and server run on the same CPUs", flush=True)
    results, failed = common.run_each_backend(
        "mailsuite-queue-bench-", remote_zones(), backends,
        lambda backend, dns, workdir: run_backend(backend, args, dns, workdir),
        keep_only_for_logs=True)
    if len(results) > 1:
        print(common.SUMMARY_TITLE)
        print(f"{'backend':<12}{'submit msg/s':>14}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'delivered s':>13}{'rcpt/s':>10}")
        for r in results:
            ms = sorted(v * 1000 for v in r.latencies)
            print(f"{r.backend:<12}{r.rate:>14.1f}{common.percentile(ms, 50):>9.1f}"
                  f"{common.percentile(ms, 99):>9.1f}{r.deliver_elapsed:>13.2f}"
                  f"{r.delivery_rate:>10.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
