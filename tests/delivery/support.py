"""Helpers for the outbound delivery tests: zones, servers and sinks, sending, waiting, DSNs."""

from __future__ import annotations

import email
import email.policy
import secrets
import smtplib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

from mailsuite.store import Event
from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite
from tests.smtpsink import CertAuthority, Received, SinkServer

PASSWORD = "correct horse"
WAIT = 15.0  # the longest any one thing may take before a test gives up


# --- DNS ---------------------------------------------------------------------------------
def mx(preference: int, host: str) -> dict[str, str]:
    return {"type": "MX", "value": f"{preference} {host}"}


def a(address: str) -> dict[str, str]:
    return {"type": "A", "value": address}


def routed(domain: str, address: str) -> dict[str, list[dict[str, str]]]:
    """`domain` with one MX, mx.<domain>, at `address`."""
    return {domain: [mx(10, f"mx.{domain}")], f"mx.{domain}": [a(address)]}


class DeliveryDNS:
    """The package's DNS server; modules add records, nothing is ever taken away."""

    def __init__(self, handle: DNSServerHandle) -> None:
        self.handle = handle
        self.records: dict[str, list[dict[str, str]]] = {}

    @property
    def address(self) -> str:
        return self.handle.address

    def add(self, records: dict[str, list[dict[str, str]]]) -> DeliveryDNS:
        clash = {name for name in records if self.records.get(name, records[name])
                 != records[name]}
        assert not clash, f"zone names used twice with different records: {sorted(clash)}"
        self.records.update(records)
        self.handle.update({"records": self.records})
        return self


# --- servers and sinks -------------------------------------------------------------------
def delivery_overrides(port: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Config for fast delivery tests: every MX on `port`, quick polls, retries after 1 s.
    `sections` are merged over it, e.g. delivery={"expire_after": "3s"}."""
    overrides: dict[str, dict[str, Any]] = {
        "auth": {"allow_plaintext": True},  # smtplib logs in without STARTTLS
        "delivery": {"port": port, "poll_interval": 0.2, "retry_schedule": "1s",
                     "expire_after": "5d", "connect_timeout": 2, "command_timeout": 5,
                     "claim_timeout": 10},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return overrides


class Servers:
    """Starts mailsuites (on a fresh database each unless db_url is given) and sinks;
    stop() ends all of them."""

    def __init__(self, backend: str, new_db_url: Callable[[str], str], dns: DeliveryDNS,
                 workdir: Path) -> None:
        self.backend, self.new_db_url, self.dns, self.workdir = backend, new_db_url, dns, workdir
        self.mailsuites: list[Mailsuite] = []
        self.sinks: list[SinkServer] = []

    def mailsuite(self, overrides: dict[str, dict[str, Any]],
                  db_url: str | None = None) -> Mailsuite:
        server = Mailsuite(self.workdir / f"mailsuite-{len(self.mailsuites)}",
                           db_url or self.new_db_url(self.backend), self.dns.address, overrides)
        self.mailsuites.append(server)
        return server.start()

    def sink(self, host: str, port: int, start: bool = True, **options: Any) -> SinkServer:
        sink = SinkServer(host, port, **options)
        self.sinks.append(sink)
        return sink.start() if start else sink

    def stop(self) -> None:
        for server in self.mailsuites:
            server.stop()
        for sink in self.sinks:
            sink.stop()


# The mailsuite that several modules share (like tests/conftest.py's `mailsuite`): each of
# them has its own sink addresses on the shared port, and its own domains. Modules with a
# mailsuite of their own put their sinks on 127.0.0.20 and above.
SHARED_SINK_HOSTS = tuple(f"127.0.0.{n}" for n in range(2, 16))
SHARED_REQUIRE_TLS = ("secure.tls.test", "plain.tls.test", "wrongname.tls.test")


@dataclass
class Shared:
    server: Mailsuite
    port: int  # [delivery] port: free on every one of SHARED_SINK_HOSTS
    ca: tuple[Path, Path, CertAuthority]  # [delivery] ca_file is ca[0]


# --- sending -----------------------------------------------------------------------------
def token() -> str:
    return secrets.token_hex(4)


def message(sender: str, recipients: Iterable[str], subject: str,
            body: str = "Hello.\r\n") -> tuple[bytes, str]:
    """(an RFC 5322 message with CRLF line ends, its Message-ID)."""
    message_id = f"<{token()}.{token()}@client.test>"
    head = (f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in recipients)}\r\n"
            f"Subject: {subject}\r\nMessage-ID: {message_id}\r\n"
            f"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n")
    if not body.isascii():
        head += "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n" \
                "Content-Transfer-Encoding: 8bit\r\n"
    return (head + "\r\n" + body).encode("utf-8"), message_id


def submit(server: Mailsuite, sender: str, recipients: list[str], raw: bytes,
           mail_options: Iterable[str] = ()) -> dict[str, tuple[int, bytes]]:
    """Send through the submission port as `sender` (an account with PASSWORD); smtplib's
    refused-recipients dict (SMTPRecipientsRefused when all are refused)."""
    with smtplib.SMTP(*server.submission, local_hostname="client.test", timeout=30) as smtp:
        smtp.login(sender, PASSWORD)
        return smtp.sendmail(sender, recipients, raw, mail_options=list(mail_options))


def submit_many(server: Mailsuite, sender: str, recipients: list[str], subject: str,
                count: int) -> list[str]:
    """`count` messages on one connection, one recipient each (round robin); Message-IDs."""
    ids = []
    with smtplib.SMTP(*server.submission, local_hostname="client.test", timeout=30) as smtp:
        smtp.login(sender, PASSWORD)
        for n in range(count):
            rcpt = recipients[n % len(recipients)]
            raw, message_id = message(sender, [rcpt], f"{subject} {n}")
            assert smtp.sendmail(sender, [rcpt], raw) == {}
            ids.append(message_id)
    return ids


# --- waiting -----------------------------------------------------------------------------
def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT,
               interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy and return its value; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def events_for(server: Mailsuite, kind: str, recipient: str) -> list[Event]:
    return [e for e in server.store.events(kind, limit=100000)
            if e.detail.get("recipient", "").lower() == recipient.lower()]


def wait_event(server: Mailsuite, kind: str, recipient: str,
               timeout: float = WAIT) -> Event:
    found = wait_until(lambda: events_for(server, kind, recipient),
                       f"a {kind!r} event for {recipient}", timeout)
    return found[0]


def received_by(sink: SinkServer, recipient: str) -> list[Received]:
    return [m for m in list(sink.messages) if recipient in m.rcpts]


def wait_received(sink: SinkServer, recipient: str, timeout: float = WAIT) -> Received:
    found = wait_until(lambda: received_by(sink, recipient),
                       f"{recipient} at the sink {sink.host}:{sink.port} "
                       f"(rcpt_log={sink.rcpt_log[-10:]})", timeout)
    return found[0]


def message_id_of(received: Received) -> str:
    return str(received.message["Message-ID"]).strip()


# --- bounces (RFC 3464 delivery status notifications) ------------------------------------
def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def dsn_blocks(raw: bytes) -> list[dict[str, str]]:
    """The field blocks of a DSN's message/delivery-status part: per-message, then one per
    recipient, with lower-cased field names."""
    report = parse(raw)
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") == "delivery-status"
    [status] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [{k.lower(): " ".join(str(v).split()) for k, v in block.items()} for block in blocks]


def typed_address(address: str) -> str:
    """A Final-Recipient value: "rfc822; a@b", or RFC 6533's utf-8-addr-xtext for non-ASCII."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(ch if ch.isascii() and ch not in "+=\\" else f"\\x{{{ord(ch):X}}}"
                               for ch in address)


def dsn_for(server: Mailsuite, sender: str,
            recipient: str) -> list[tuple[bytes, dict[str, str]]]:
    """Every DSN in `sender`'s INBOX about `recipient`: (raw, its recipient block)."""
    found = []
    for raw in server.inbox(sender):
        if parse(raw).get_content_type() != "multipart/report":
            continue
        for block in dsn_blocks(raw)[1:]:
            if block.get("final-recipient", "").lower() == typed_address(recipient).lower():
                found.append((raw, block))
    return found


def wait_dsn(server: Mailsuite, sender: str, recipient: str,
             timeout: float = WAIT) -> tuple[bytes, dict[str, str]]:
    found = wait_until(lambda: dsn_for(server, sender, recipient),
                       f"a DSN about {recipient} in {sender}'s INBOX", timeout)
    assert len(found) == 1, f"{len(found)} DSNs about {recipient}"
    return found[0]
