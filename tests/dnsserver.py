"""A small authoritative DNS server for tests, built on twisted.names.

Run it as a subprocess::

    python tests/dnsserver.py --zones ZONES.json --port-file PORTFILE [--reload-file FILE]

It listens on UDP and TCP on 127.0.0.1 (same port number on both), writes the port to
PORTFILE once it is ready, reloads ZONES.json on SIGHUP and exits on SIGTERM.

The zones file looks like::

    {"records": {"example.test": [{"type": "MX", "value": "10 mx.example.test"},
                                  {"type": "TXT", "value": "v=spf1 -all", "ttl": 60}]},
     "servfail": ["servfail.test"],
     "timeout": ["timeout.test"]}

Supported types: A, AAAA, MX ("pref host"), TXT, CNAME, PTR.  Names under a "servfail"
entry get SERVFAIL, names under a "timeout" entry get no answer at all.

The test process uses :func:`start_dns_server`, which returns a :class:`DNSServerHandle`.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.error import CannotListenError
from twisted.names import dns, server

__all__ = [
    "DNSServerHandle",
    "ZoneDNSServerFactory",
    "Zones",
    "main",
    "parse_zones",
    "start_dns_server",
]

HOST = "127.0.0.1"
DEFAULT_TTL = 300
# Longest character-string a TXT record can hold (one length octet).
TXT_CHUNK = 255
# Guard against CNAME loops in the zone data.
MAX_CNAME_HOPS = 8
# Classic DNS UDP limit when the client did not advertise a bigger one via EDNS.
UDP_DEFAULT_LIMIT = 512

_TYPES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "TXT": dns.TXT,
    "CNAME": dns.CNAME,
    "PTR": dns.PTR,
}


# --------------------------------------------------------------------------- zone data


def normalize_name(name: str | bytes) -> str:
    """Lower-case a DNS name and drop the trailing dot (names compare case-insensitively)."""
    if isinstance(name, bytes):
        # Wire names are arbitrary octets; latin-1 maps them 1:1 without failing.
        name = name.decode("latin-1")
    return name.strip().rstrip(".").lower()


def _is_at_or_under(name: str, parent: str) -> bool:
    return name == parent or parent == "" or name.endswith("." + parent)


def _txt_strings(value: Any) -> list[bytes]:
    # A list value gives the character-strings explicitly; each is still capped at 255.
    parts = value if isinstance(value, list) else [value]
    chunks: list[bytes] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"TXT value must be a string or list of strings: {value!r}")
        raw = part.encode("utf-8")
        # Long values (DKIM keys) must become several strings of one record.
        chunks.extend(raw[i : i + TXT_CHUNK] for i in range(0, len(raw), TXT_CHUNK))
        if not raw:
            chunks.append(b"")
    return chunks


def _make_record(owner: str, spec: Any) -> dns.RRHeader:
    if not isinstance(spec, Mapping):
        raise ValueError(f"{owner}: record must be an object, got {spec!r}")
    rtype = str(spec.get("type", "")).upper()
    if rtype not in _TYPES:
        raise ValueError(f"{owner}: unsupported record type {spec.get('type')!r}")
    if "value" not in spec:
        raise ValueError(f"{owner}: {rtype} record has no value")
    value = spec["value"]
    try:
        ttl = int(spec.get("ttl", DEFAULT_TTL))
        payload: Any
        if rtype == "A":
            payload = dns.Record_A(str(ipaddress.IPv4Address(value)), ttl=ttl)
        elif rtype == "AAAA":
            payload = dns.Record_AAAA(str(ipaddress.IPv6Address(value)), ttl=ttl)
        elif rtype == "MX":
            pref, host = str(value).split()
            payload = dns.Record_MX(int(pref), normalize_name(host), ttl=ttl)
        elif rtype == "TXT":
            payload = dns.Record_TXT(*_txt_strings(value), ttl=ttl)
        elif rtype == "CNAME":
            payload = dns.Record_CNAME(normalize_name(value), ttl=ttl)
        else:
            payload = dns.Record_PTR(normalize_name(value), ttl=ttl)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{owner}: bad {rtype} record {dict(spec)!r}: {exc}") from exc
    return dns.RRHeader(
        name=owner, type=_TYPES[rtype], cls=dns.IN, ttl=ttl, payload=payload, auth=True
    )


@dataclass(frozen=True)
class Zones:
    """Parsed, normalized zone data; see :func:`parse_zones`."""

    records: dict[str, list[dns.RRHeader]] = field(default_factory=dict)
    servfail: tuple[str, ...] = ()
    timeout: tuple[str, ...] = ()
    # Every owner name plus all its ancestors, so empty non-terminals are NODATA.
    existing: frozenset[str] = frozenset()

    def lookup(self, name: str | bytes, qtype: int) -> tuple[int, list[dns.RRHeader]] | None:
        """Answer a query: ``(rcode, answers)``, or None when the server must stay silent."""
        name = normalize_name(name)
        if any(_is_at_or_under(name, t) for t in self.timeout):
            return None
        if any(_is_at_or_under(name, s) for s in self.servfail):
            return dns.ESERVER, []
        answers: list[dns.RRHeader] = []
        for _ in range(MAX_CNAME_HOPS):
            if name not in self.existing:
                # A dangling in-data CNAME still answers NOERROR with the CNAME.
                return (dns.OK if answers else dns.ENAME), answers
            rrs = self.records.get(name, [])
            matching = [rr for rr in rrs if qtype in (rr.type, dns.ALL_RECORDS)]
            cname = [rr for rr in rrs if rr.type == dns.CNAME]
            if matching or not cname or qtype == dns.CNAME:
                return dns.OK, answers + matching
            # Follow the alias inside our own data, as an authoritative server does.
            answers.append(cname[0])
            name = normalize_name(cname[0].payload.name.name)
        return dns.OK, answers


def parse_zones(data: Mapping[str, Any]) -> Zones:
    """Validate and normalize a zones mapping (the ZONES.json format); raises ValueError."""
    if not isinstance(data, Mapping):
        raise ValueError("zones must be a JSON object")
    # "_generation" is a nonce added by DNSServerHandle.update(); it carries no data.
    unknown = set(data) - {"records", "servfail", "timeout", "_generation"}
    if unknown:
        raise ValueError(f"unknown zones keys: {sorted(unknown)}")
    records: dict[str, list[dns.RRHeader]] = {}
    raw_records = data.get("records", {})
    if not isinstance(raw_records, Mapping):
        raise ValueError('"records" must be an object of name -> list of records')
    for raw_name, specs in raw_records.items():
        owner = normalize_name(raw_name)
        if not isinstance(specs, list):
            raise ValueError(f"{raw_name}: records must be a list")
        # Names differing only in case or trailing dot are the same name: merge them.
        records.setdefault(owner, []).extend(_make_record(owner, spec) for spec in specs)

    existing = set()
    for owner in records:
        labels = owner.split(".")
        existing.update(".".join(labels[i:]) for i in range(len(labels)))

    def names(key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f'"{key}" must be a list of names')
        return tuple(normalize_name(v) for v in value)

    return Zones(
        records=records,
        servfail=names("servfail"),
        timeout=names("timeout"),
        existing=frozenset(existing),
    )


def load_zones(path: Path) -> Zones:
    """Read and parse a ZONES.json file."""
    return parse_zones(json.loads(path.read_text(encoding="utf-8")))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    # Write then rename, so a reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ server


class ZoneDNSServerFactory(server.DNSServerFactory):
    """DNSServerFactory answering every query authoritatively from a :class:`Zones`."""

    def __init__(self, zones: Zones) -> None:
        super().__init__()
        self.zones = zones

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:  # noqa: N802
        # Answer synchronously from our data instead of going through a resolver chain,
        # so we control rcode, the AA bit and silence ourselves.
        query = message.queries[0]
        if query.cls not in (dns.IN, dns.ANY):
            self._reply(protocol, message, address, dns.EREFUSED, [])
            return
        result = self.zones.lookup(query.name.name, query.type)
        if result is None:
            return  # "timeout" name: never answer, so the client times out
        rcode, answers = result
        self._reply(protocol, message, address, rcode, answers)

    def _reply(
        self,
        protocol: Any,
        message: dns.Message,
        address: Any,
        rcode: int,
        answers: list[dns.RRHeader],
    ) -> None:
        response = dns.Message(
            id=message.id,
            answer=1,
            opCode=message.opCode,
            auth=1,
            recDes=message.recDes,
            recAv=0,
            rCode=rcode,
            # 0 disables Twisted's own truncation, which cuts records in half.
            maxSize=0,
        )
        response.queries = list(message.queries)
        # sendReply() logs the processing time from this attribute.
        response.timeReceived = message.timeReceived
        response.answers = answers
        if isinstance(protocol, dns.DNSDatagramProtocol):
            limit = UDP_DEFAULT_LIMIT
            for rr in message.additional:
                if rr.type == dns.OPT:
                    # EDNS puts the client's UDP payload size in the CLASS field.
                    limit = max(limit, rr.cls)
            if len(response.toStr()) > limit:
                # Real servers send an empty TC answer; the client retries over TCP.
                response.answers = []
                response.trunc = 1
        self.sendReply(protocol, response, address)


def _listen(factory: ZoneDNSServerFactory, attempts: int = 10) -> int:
    """Bind UDP on an ephemeral port, then TCP on the same number; return the port."""
    last_error: Exception | None = None
    for _ in range(attempts):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface=HOST)
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface=HOST)
        except CannotListenError as exc:
            # Someone holds that TCP port: give the UDP one back and try another.
            last_error = exc
            udp.stopListening()
            continue
        return port
    raise RuntimeError(f"could not bind UDP+TCP on the same port: {last_error}")


def serve(
    zones_path: Path,
    port_file: Path,
    reload_file: Path | None = None,
    exit_with_parent: bool = False,
) -> None:
    """Run the server until SIGTERM/SIGINT; reload ``zones_path`` on SIGHUP."""
    raw = zones_path.read_bytes()
    factory = ZoneDNSServerFactory(parse_zones(json.loads(raw)))
    reloads = 0

    def write_reload_state(sha256: str, error: str | None) -> None:
        # The digest of what was read lets the waiter tell its own reload from a stray one.
        if reload_file is not None:
            state = {"reloads": reloads, "sha256": sha256, "error": error}
            _write_atomic(reload_file, json.dumps(state))

    def reload() -> None:
        nonlocal reloads
        reloads += 1
        raw = b""
        try:
            raw = zones_path.read_bytes()
            factory.zones = parse_zones(json.loads(raw))
        except (OSError, ValueError) as exc:
            # Keep serving the old data; the error is reported through the reload file.
            print(f"dnsserver: reload failed: {exc}", file=sys.stderr, flush=True)
            write_reload_state(_digest(raw), str(exc))
            return
        write_reload_state(_digest(raw), None)

    # Install the SIGHUP handler before announcing the port: SIGHUP's default kills us.
    # callFromThread wakes the reactor safely from a signal handler.
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))
    port = _listen(factory)
    write_reload_state(_digest(raw), None)
    _write_atomic(port_file, f"{port}\n")
    if exit_with_parent:
        # If the test process dies without stop() (SIGKILL, crash), we get reparented:
        # notice that and exit instead of lingering forever.
        parent = os.getppid()

        def check_parent() -> None:
            if os.getppid() != parent:
                reactor.stop()

        task.LoopingCall(check_parent).start(0.5)
    print(f"dnsserver: serving on {HOST}:{port} (UDP+TCP)", file=sys.stderr, flush=True)
    reactor.run()  # Twisted's own handlers stop the reactor on SIGTERM/SIGINT


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Authoritative DNS server for tests.")
    parser.add_argument("--zones", type=Path, required=True, help="zones JSON file")
    parser.add_argument("--port-file", type=Path, required=True, help="where to write the port")
    parser.add_argument(
        "--reload-file",
        type=Path,
        help='JSON {"reloads": N, "sha256": ..., "error": ...} rewritten after each (re)load',
    )
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="exit when the parent process dies"
    )
    args = parser.parse_args(argv)
    serve(args.zones, args.port_file, args.reload_file, args.exit_with_parent)
    return 0


# -------------------------------------------------------------------- test-side helper


class DNSServerHandle:
    """A running ``dnsserver.py`` subprocess, as returned by :func:`start_dns_server`."""

    host = HOST

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, workdir: Path, log_path: Path
    ) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.log_path = log_path
        self.zones_path = workdir / "zones.json"
        self.reload_path = workdir / "reloads.json"
        self._generation = 0

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"{HOST}:{self.port}"

    def update(self, zones: Mapping[str, Any], timeout: float = 10.0) -> None:
        """Replace the zone data and return once the server has reloaded it."""
        parse_zones(zones)  # fail here, in the test, rather than in the server
        if self.process.poll() is not None:
            raise RuntimeError(f"DNS server is not running\n{self.log()}")
        # A nonce makes the content (and so its digest) unique even when rewriting the
        # same zones, so an earlier reload can never be mistaken for this one.
        self._generation += 1
        text = json.dumps({**zones, "_generation": self._generation}, indent=2)
        expected = _digest(text.encode("utf-8"))
        _write_atomic(self.zones_path, text)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = _read_json(self.reload_path)
            if state and state.get("sha256") == expected:
                if state.get("error"):
                    raise RuntimeError(f"DNS server rejected the zones: {state['error']}")
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"DNS server died during reload\n{self.log()}")
            time.sleep(0.01)
        raise TimeoutError(f"DNS server did not reload within {timeout} s\n{self.log()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL); safe to call more than once."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        """The server's stderr so far (for failure messages)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> DNSServerHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<DNSServerHandle {self.address} pid={self.process.pid}>"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def start_dns_server(
    zones: Mapping[str, Any], workdir: Path, timeout: float = 10.0
) -> DNSServerHandle:
    """Start ``dnsserver.py`` serving ``zones`` and wait until it is listening.

    Files go in a fresh subdirectory of ``workdir``, so several servers can share it.
    The caller must call ``.stop()`` (or use the handle as a context manager).
    """
    parse_zones(zones)  # fail fast with a readable error in the test process
    workdir.mkdir(parents=True, exist_ok=True)
    own_dir = Path(tempfile.mkdtemp(prefix="dnsserver-", dir=workdir))
    zones_path = own_dir / "zones.json"
    port_path = own_dir / "port"
    log_path = own_dir / "server.log"
    _write_atomic(zones_path, json.dumps(zones, indent=2))
    with log_path.open("wb") as log_file:
        # stderr to a file, not a pipe: a pipe nobody reads could fill up and block it.
        process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--zones",
                str(zones_path),
                "--port-file",
                str(port_path),
                "--reload-file",
                str(own_dir / "reloads.json"),
                "--exit-with-parent",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=own_dir,
        )
    handle = DNSServerHandle(process, 0, own_dir, log_path)
    deadline = time.monotonic() + timeout
    try:
        while True:
            text = port_path.read_text(encoding="utf-8") if port_path.exists() else ""
            if text.strip():
                handle.port = int(text)
                return handle
            if process.poll() is not None:
                raise RuntimeError(f"DNS server exited with {process.returncode}\n{handle.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"DNS server did not start within {timeout} s\n{handle.log()}")
            time.sleep(0.02)
    except BaseException:
        handle.stop()  # never leak the subprocess
        raise


if __name__ == "__main__":
    sys.exit(main())
