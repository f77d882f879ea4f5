"""What the benchmark scripts in scripts/bench (smtp_load, pop3_load, imap_load) share.

Each of them runs the real server (``twistd -n mailsuite`` through tests/harness.Mailsuite)
next to a loopback DNS server (tests/dnsserver.py), on a fresh database per run: a temporary
SQLite file, or a throwaway PostgreSQL database ``mailsuite_bench_<hex>`` created through
``--pg-url`` and dropped afterwards. This module holds that setup and its teardown on exit,
Ctrl-C or SIGTERM; the CPU and memory figures read from /proc; the forked client processes;
the options every script has; and the layout of the result blocks.

The scripts put the repository root and this directory on sys.path before importing it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import queue
import random
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

from mailsuite.store import Delivery
from tests.dnsserver import DNSServerHandle, start_dns_server
from tests.harness import Mailsuite

DEFAULT_PG_URL = os.environ.get("MAILSUITE_TEST_PG_URL",
                                "postgresql://postgres@127.0.0.1:5432/postgres")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SEQ_HEADER = b"X-Bench-Seq"
# The rule above the side-by-side summary of several backends, as wide as a result block.
SUMMARY_TITLE = "\n== summary " + "=" * 61


# --------------------------------------------------------------------------- options


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")


def add_pg_url_argument(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """--pg-url; `several` when the script makes more than one database through it."""
    made = "throwaway databases are" if several else "a throwaway database is"
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL,
                        help=f"PostgreSQL admin URL; {made} created through it "
                             "(default: $MAILSUITE_TEST_PG_URL or %(default)s)")


def backends_of(choice: str) -> list[str]:
    """The backends that --backend names, in the order they are run."""
    return ["sqlite", "postgresql"] if choice == "both" else [choice]


# ---------------------------------------------------------------------------- process


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C or SIGTERM: unwind through every cleanup once, then ignore repeats.

    Ignoring a second Ctrl-C lets the cleanups (stopping the server, dropping the database)
    finish instead of being cut short half-way.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def prepare_run() -> None:
    """Set this process up for a run, before anything is started that needs cleaning up.

    Ctrl-C and SIGTERM then unwind through the cleanups (SIGTERM too, so that a killed run
    still stops its server and drops its database). MAILSUITE_* variables are reported: the
    server reads them from the environment it inherits, and they may skew the figures.
    """
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    stray = sorted(k for k in os.environ
                   if k.startswith("MAILSUITE_") and not k.startswith("MAILSUITE_TEST_"))
    if stray:
        print(f"note: the server will honour {', '.join(stray)} from the environment",
              file=sys.stderr)


def run_benchmark(prefix: str, zones: dict[str, Any],
                  work: Callable[[DNSServerHandle, Path], None], *,
                  name_exception_type: bool = False, keep_only_for_logs: bool = False) -> bool:
    """Run ``work(dns, workroot)`` in a new temporary directory; True if it failed.

    `work` gets a loopback DNS server serving `zones` and the directory (named with `prefix`)
    to put each server's work directory in. A failure (with the end of every server log) or
    Ctrl-C is reported rather than raised, so that the caller can still print what it has.
    The DNS server is stopped in any case. The directory is removed after a success;
    after a failure it is kept for a look at the logs (with `keep_only_for_logs`, only when
    there are logs to look at).
    """
    workroot = Path(tempfile.mkdtemp(prefix=prefix))
    failed = logs_shown = False
    dns: DNSServerHandle | None = None
    try:
        dns = start_dns_server(zones, workroot)
        work(dns, workroot)
    except KeyboardInterrupt:
        failed = True
        print("\ninterrupted; cleaning up ...", file=sys.stderr)
    except Exception as exc:
        failed = True
        what = f"{type(exc).__name__}: {exc}" if name_exception_type else str(exc)
        print(f"\nbenchmark failed: {what}", file=sys.stderr)
        for log in sorted(workroot.glob("*/twistd.log")):
            logs_shown = True
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
            print(f"--- last lines of {log}:\n" + "\n".join(tail), file=sys.stderr)
    finally:
        if dns is not None:
            dns.stop()
        if keep_only_for_logs and logs_shown:
            print(f"(work directory kept for its logs: {workroot})", file=sys.stderr)
        elif failed and not keep_only_for_logs:
            print(f"(work directory kept: {workroot})", file=sys.stderr)
        else:
            shutil.rmtree(workroot, ignore_errors=True)
    return failed


class HasBlock(Protocol):
    """A result that prints as a block of its own (see format_block)."""

    def block(self) -> str: ...


ResultT = TypeVar("ResultT", bound=HasBlock)


def run_each_backend(prefix: str, zones: dict[str, Any], backends: list[str],
                     run: Callable[[str, DNSServerHandle, Path], ResultT],
                     **options: bool) -> tuple[list[ResultT], bool]:
    """run_benchmark() of ``run(backend, dns, workdir)`` for each backend in turn.

    Each result's block is printed as soon as it is there, so that a later failure does not
    lose it. `options` are run_benchmark()'s. Returns (the results there are, whether the run
    failed), so that the caller can still compare the backends that finished.
    """
    results: list[ResultT] = []

    def work(dns: DNSServerHandle, workroot: Path) -> None:
        for backend in backends:
            result = run(backend, dns, workroot / backend)
            results.append(result)
            print(result.block(), flush=True)

    failed = run_benchmark(prefix, zones, work, **options)
    return results, failed


# --------------------------------------------------------------------------- messages


def text_body(size: int, seed: int, *, dot_lines: bool = False) -> bytes:
    """About `size` bytes of text in CRLF lines of at most 78 octets, the same for a seed.

    With `dot_lines`, every 17th line starts with a dot, so that dot-stuffing is part of the
    work; otherwise no line starts with one.
    """
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(500)]
    lines: list[bytes] = []
    total = 0
    while total < size:
        line = b""
        while len(line) < 70:
            line += rng.choice(words) + b" "
        line = line[: max(1, min(76, size - total - 2))].rstrip() or b"x"
        if dot_lines and len(lines) % 17 == 5:
            line = b"." + line[1:]
        lines.append(line + b"\r\n")
        total += len(lines[-1])
    return b"".join(lines)


# -------------------------------------------------------------------------- measuring


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        # The command name in parentheses may hold spaces: count fields after its ")".
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int | None:
    """A memory figure from /proc/<pid>/status (VmRSS, VmHWM), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def proc_peak_rss_kib(pid: int) -> int | None:
    """The peak resident set size of a process (VmHWM), in KiB."""
    return proc_status_kib(pid, "VmHWM")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """CPU of the child processes reaped so far (join the clients before reading it)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def host_cpu_jiffies() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; (0, 0) if unreadable."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # Only the first 8 fields: guest time is already counted in user and nice.
    return float(sum(values[:8]) - idle), float(sum(values[:8]))


def host_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot, from /proc/stat."""
    return host_cpu_jiffies()[0] / CLK_TCK


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class PostgresCPU:
    """CPU of the PostgreSQL backends serving one database (when PostgreSQL runs here)."""

    def __init__(self, admin_url: str, dbname: str) -> None:
        self.admin_url = admin_url
        self.dbname = dbname
        self.start: dict[int, float] = {}

    def _sample(self) -> dict[int, float]:
        import psycopg2

        conn = psycopg2.connect(self.admin_url, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s",
                            (self.dbname,))
                pids = [row[0] for row in cur.fetchall()]
        finally:
            conn.close()
        # A remote PostgreSQL's pids are not in our /proc: no sample, and end() says None.
        return {pid: cpu for pid in pids if (cpu := proc_cpu_seconds(pid)) is not None}

    def begin(self) -> None:
        # A missing figure must not fail the benchmark; end() then counts from zero.
        with contextlib.suppress(Exception):
            self.start = self._sample()

    def end(self) -> float | None:
        try:
            now = self._sample()
        except Exception:
            return None
        if not now:
            return None
        return sum(cpu - self.start.get(pid, 0.0) for pid, cpu in now.items())


# ------------------------------------------------------------------------------ setup


def _pg_admin(url: str):  # type: ignore[no-untyped-def]
    # psycopg2 is imported here so that a SQLite-only run works without it.
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    conn.autocommit = True  # CREATE and DROP DATABASE refuse to run in a transaction
    return conn


@contextlib.contextmanager
def pg_database(admin_url: str) -> Iterator[tuple[str, str]]:
    """A throwaway database: yields (its URL, its name); dropped afterwards, whatever happens."""
    name = f"mailsuite_bench_{secrets.token_hex(5)}"
    conn = _pg_admin(admin_url)
    try:
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    try:
        base, _, _ = admin_url.rpartition("/")
        yield f"{base}/{name}", name
    finally:
        conn = _pg_admin(admin_url)
        try:
            # FORCE: a server killed half-way may leave connections that would block the DROP.
            conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()


@contextlib.contextmanager
def backend_database(backend: str, workdir: Path,
                     pg_url: str) -> Iterator[tuple[str, PostgresCPU | None]]:
    """A fresh database for one server: yields (its URL, a meter of its PostgreSQL CPU).

    SQLite: a file in the server's var directory, which goes with the work directory.
    PostgreSQL: a throwaway database created through `pg_url`, dropped afterwards.
    """
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'var' / 'mailsuite.db'}", None
        return
    with pg_database(pg_url) as (db_url, dbname):
        yield db_url, PostgresCPU(pg_url, dbname)


@contextlib.contextmanager
def running_server(workdir: Path, db_url: str, dns: DNSServerHandle,
                   overrides: dict[str, dict[str, Any]]) -> Iterator[Mailsuite]:
    """The real server, configured with `overrides`, started and stopped around the block."""
    server = Mailsuite(workdir, db_url, dns.address, overrides)
    try:
        server.start(timeout=60)
        yield server
    finally:
        # Also after a failed or interrupted start: stop() is a no-op without a process.
        server.stop()


def deliver_in_batches(server: Mailsuite, count: int, batch: int,
                       make: Callable[[int], Delivery],
                       progress: Callable[[int], None] | None = None) -> tuple[int, float]:
    """Deliver messages ``make(0) .. make(count - 1)`` through the store, `batch` at a time.

    Going straight through the store (``Store.deliver_many``, one transaction per batch) is
    much faster than SMTP: filling a mailbox is setup, not what is measured. `progress` is
    told how many are done after each batch. Returns (total bytes, seconds taken).
    """
    total = 0
    start = time.monotonic()
    for first in range(0, count, batch):
        deliveries = [make(seq) for seq in range(first, min(count, first + batch))]
        results = server.store.deliver_many(deliveries)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise RuntimeError(f"delivery through the store failed: {failed[0]!r}")
        total += sum(len(d.raw) for d in deliveries)
        if progress is not None:
            progress(first + len(deliveries))
    return total, time.monotonic() - start


# ---------------------------------------------------------------------------- clients


class ClientProcesses:
    """Client processes that start work together and report once each; a context manager.

    The clients are forked processes so that they load the server in parallel (no GIL) and
    their CPU is counted apart from ours (RUSAGE_CHILDREN). ``start(target, args)`` runs
    ``target(*args, barrier, results, index)``: the client waits on `barrier` once it is
    ready (and aborts it if it fails, so that nobody waits for it), then puts one report on
    `results`. Leaving the block terminates any client still running.
    """

    def __init__(self, count: int, name: str) -> None:
        self._ctx = mp.get_context("fork")
        self._name = name
        self.barrier = self._ctx.Barrier(count + 1)  # the clients and this process
        self.results = self._ctx.Queue()
        self.procs: list[BaseProcess] = []

    def __enter__(self) -> ClientProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5)

    def start(self, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        index = len(self.procs)
        proc = self._ctx.Process(target=target, name=f"{self._name}-{index}", daemon=True,
                                 args=(*args, self.barrier, self.results, index))
        proc.start()
        self.procs.append(proc)

    def wait_for_start(self, timeout: float) -> None:
        # A broken barrier means a client failed before the start; its error is in the queue.
        with contextlib.suppress(threading.BrokenBarrierError):
            self.barrier.wait(timeout=timeout)

    def next_result(self) -> Any:
        """The next report from a client; raises if a client died without reporting."""
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"client {dead[0].name} died with exit code "
                                       f"{dead[0].exitcode}") from None

    def collect_latencies(self, started: float) -> tuple[float, list[float]]:
        """(when the last client finished, every latency) from clients that each report
        (index, latencies as array('d') bytes, end time, error); any error fails the run."""
        latencies: list[float] = []
        finished = started
        errors = []
        for _ in range(len(self.procs)):
            index, raw, end, error = self.next_result()
            if error:
                errors.append(f"client {index}: {error}")
                self.barrier.abort()
                continue
            values = array("d")
            values.frombytes(raw)
            latencies.extend(values)
            finished = max(finished, end)
        if errors:
            raise RuntimeError("clients failed:\n  " + "\n  ".join(errors[:10]))
        return finished, latencies

    def join(self, timeout: float = 10.0) -> None:
        """Wait for every client to exit; reaped, their CPU counts in RUSAGE_CHILDREN."""
        for proc in self.procs:
            proc.join(timeout)


# ----------------------------------------------------------------------------- output


def format_block(title: str, rows: list[tuple[str, str]], width: int = 72) -> str:
    """A result block: a ``== title ===`` rule `width` wide, then the rows, keys aligned."""
    key_width = max(len(k) for k, _ in rows)
    head = f"== {title} "
    lines = [head + "=" * max(4, width - len(head))]
    lines += [f"{k:<{key_width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def format_cpu(seconds: float | None, elapsed: float, core: str = "one core") -> str:
    """CPU seconds and what share of one core they are over `elapsed`; n/a when unknown."""
    if seconds is None:
        return "n/a"
    return f"{seconds:.1f} s ({100 * seconds / elapsed:.0f}% of {core})"
