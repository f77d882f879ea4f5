"""IMAP sessions against the running service: greeting and CAPABILITY (RFC 3501 6.1.1, 7.2.1),
STARTTLS and implicit TLS (RFC 3501 6.2.1, RFC 8314), LOGIN and AUTHENTICATE PLAIN with SASL-IR
(RFC 3501 6.2.2-6.2.3, RFC 4616, RFC 4959), ID (RFC 2971), NAMESPACE (RFC 2342), ENABLE
(RFC 5161), NOOP and LOGOUT, command states, the autologout timer, connection limits and the
limits on lines and literals (RFC 7888).

The helpers at the top (a raw wire client, a parser for IMAP data, login helpers) are shared
with the other tests/imap/test_imap_*.py modules.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite, own_server

PASSWORD = "correct horse"
SENDER = "a@spf-pass.test"
# What the server implements in every state (see the server's module docstring).
BASE_CAPS = {"IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE",
             "UIDPLUS", "MOVE", "UNSELECT", "SPECIAL-USE", "CHILDREN"}


# =========================================================================== helpers
def tls_context() -> ssl.SSLContext:
    """The server's certificate is self-signed for mx.mailsuite.test: do not verify it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Closed(ConnectionError):
    """The server closed the connection."""


@dataclass
class Reply:
    """The answer to one command: its untagged responses and the tagged completion."""

    untagged: list[bytes]
    tagged: bytes

    @property
    def status(self) -> str:
        """OK, NO or BAD."""
        parts = self.tagged.split(b" ", 2)
        return parts[1].decode() if len(parts) > 1 else ""

    @property
    def text(self) -> str:
        parts = self.tagged.split(b" ", 2)
        return parts[2].decode("utf-8", "replace") if len(parts) > 2 else ""

    @property
    def code(self) -> str:
        """The response code of the tagged answer, e.g. "APPENDUID 123 4" (or "")."""
        m = re.match(r"\[([^\]]*)\]", self.text)
        return m.group(1) if m else ""

    def lines(self, kind: str) -> list[bytes]:
        """Untagged responses of one kind: "* LIST ..." for "LIST", "* 3 EXISTS" for "EXISTS"."""
        out = []
        for line in self.untagged:
            words = line.split(b" ", 3)
            numbered = len(words) > 2 and words[1].isdigit()
            if len(words) > 1 and words[2 if numbered else 1].upper() == kind.encode():
                out.append(line)
        return out

    def __repr__(self) -> str:
        return f"Reply(untagged={self.untagged!r}, tagged={self.tagged!r})"


class Wire:
    """A socket IMAP client showing the server's bytes as they are: responses are read whole,
    literals included (kept as {n}CRLF<octets> in the response), CRLF stripped at the end."""

    def __init__(self, address: tuple[str, int], tls: bool = False, timeout: float = 15.0,
                 greet: bool = True) -> None:
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection(address, timeout=timeout)
        if tls:
            self.sock = tls_context().wrap_socket(self.sock)
        self.buffer = bytearray()
        self._tags = 0
        self.greeting = self.read() if greet else b""

    # --- raw I/O ---------------------------------------------------------------------------
    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self, deadline: float) -> None:
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, BrokenPipeError):
            data = b""
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            raise Closed(f"connection closed by the server; unread: {bytes(self.buffer)!r}")
        self.buffer += data

    def _line(self, deadline: float) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill(deadline)
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 2]
        return line

    def read(self, timeout: float | None = None) -> bytes:
        """One response, literals included; TimeoutError if it does not come in time."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        out = bytearray()
        while True:
            line = self._line(deadline)
            out += line
            m = re.search(rb"\{(\d+)\}$", line)
            if not m:
                return bytes(out)
            size = int(m.group(1))
            out += b"\r\n"
            while len(self.buffer) < size:
                self._fill(deadline)
            out += self.buffer[:size]
            del self.buffer[:size]

    def maybe_read(self, timeout: float) -> bytes | None:
        """The next response if one comes within `timeout` seconds, else None."""
        try:
            return self.read(timeout)
        except TimeoutError:
            return None

    def quiet(self, wait: float = 0.2) -> bool:
        """True if the server sends nothing within `wait` seconds."""
        return not self.buffer and self.maybe_read(wait) is None

    def read_until_closed(self, wait: float = 10.0) -> list[bytes] | None:
        """The responses sent before the server closed the connection, None if still open."""
        deadline = time.monotonic() + wait
        out: list[bytes] = []
        try:
            while True:
                out.append(self.read(max(0.001, deadline - time.monotonic())))
        except Closed:
            if self.buffer:
                out.append(bytes(self.buffer))
            return out
        except TimeoutError:
            return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def starttls(self) -> None:
        assert not self.buffer, f"unread plaintext before TLS: {bytes(self.buffer)!r}"
        self.sock = tls_context().wrap_socket(self.sock)

    # --- commands --------------------------------------------------------------------------
    def tag(self) -> str:
        self._tags += 1
        return f"t{self._tags}"

    def finish(self, tag: str, timeout: float | None = None) -> Reply:
        """Read responses up to the tagged completion of `tag`."""
        untagged = []
        while True:
            line = self.read(timeout)
            if line.startswith(tag.encode() + b" "):
                return Reply(untagged, line)
            untagged.append(line)

    def command(self, text: str | bytes, timeout: float | None = None) -> Reply:
        tag = self.tag()
        self.send((tag + " ").encode() + (text.encode() if isinstance(text, str) else text)
                  + b"\r\n")
        return self.finish(tag, timeout)

    def ok(self, text: str | bytes) -> Reply:
        reply = self.command(text)
        assert reply.status == "OK", (text, reply)
        return reply

    def login(self, address: str, password: str = PASSWORD) -> Reply:
        return self.ok(f"LOGIN {quote(address)} {quote(password)}")

    def append(self, mailbox: str, raw: bytes, flags: str | None = None,
               date: str | None = None) -> tuple[int, int]:
        """APPEND with a LITERAL+ literal; (uidvalidity, uid) from APPENDUID."""
        extra = (f" ({flags})" if flags is not None else "") + (f' "{date}"' if date else "")
        reply = self.ok(f"APPEND {quote(mailbox)}{extra} {{{len(raw)}+}}\r\n".encode()
                        + raw)
        m = re.fullmatch(r"APPENDUID (\d+) (\d+)", reply.code)
        assert m, reply
        return int(m.group(1)), int(m.group(2))

    def fetch(self, what: str, items: str, uid: bool = False) -> dict[int, dict[str, Any]]:
        """FETCH (or UID FETCH): sequence number → {item: value}, from the untagged FETCHes."""
        reply = self.ok(f"{'UID ' if uid else ''}FETCH {what} {items}")
        return fetch_results(reply)

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plain_response(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def capabilities(line: bytes) -> set[str]:
    """The capability names in "* CAPABILITY ..." or a "[CAPABILITY ...]" response code."""
    text = line.decode()
    m = re.search(r"\[CAPABILITY ([^\]]*)\]", text)
    if m:
        return set(m.group(1).split())
    assert text.startswith("* CAPABILITY "), text
    return set(text[len("* CAPABILITY "):].split())


def ask_capabilities(client: Wire) -> set[str]:
    reply = client.ok("CAPABILITY")
    [line] = reply.lines("CAPABILITY")
    return capabilities(line)


@contextlib.contextmanager
def session(server: Mailsuite, address: str | None = None, via: str = "imaps",
            password: str = PASSWORD) -> Iterator[Wire]:
    """A Wire client: "imaps" (implicit TLS), "starttls" or "plain" (port imap); logged in
    when `address` is given."""
    client = Wire(server.imaps if via == "imaps" else server.imap, tls=via == "imaps")
    try:
        assert client.greeting.startswith(b"* OK"), client.greeting
        if via == "starttls":
            client.ok("STARTTLS")
            client.starttls()
        if address is not None:
            client.login(address, password)
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def imaplib_session(server: Mailsuite, address: str,
                    password: str = PASSWORD) -> Iterator[imaplib.IMAP4_SSL]:
    """An imaplib client over imaps, logged in."""
    client = imaplib.IMAP4_SSL(*server.imaps, ssl_context=tls_context(), timeout=15)
    try:
        client.login(address, password)
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.shutdown()


# --- IMAP data -----------------------------------------------------------------------------
class Atom(str):
    """A bare word in a response (numbers, flags, NIL is None); strings are bytes."""


def parse_data(data: bytes) -> list[Any]:
    """The items of IMAP response data: lists as lists, strings and literals as bytes, NIL as
    None, other words (atoms, numbers, BODY[...]<n>) as Atom."""
    items, pos = _items(data, 0, None)
    assert pos == len(data), (data[pos:pos + 50], data)
    return items


def _items(data: bytes, pos: int, closer: int | None) -> tuple[list[Any], int]:
    items: list[Any] = []
    while pos < len(data):
        c = data[pos]
        if c == 0x20:
            pos += 1
        elif c == closer:
            return items, pos + 1
        elif c == 0x28:  # (
            inner, pos = _items(data, pos + 1, 0x29)
            items.append(inner)
        elif c == 0x22:  # "
            out = bytearray()
            pos += 1
            while data[pos] != 0x22:
                if data[pos] == 0x5C:
                    pos += 1
                out.append(data[pos])
                pos += 1
            items.append(bytes(out))
            pos += 1
        elif c == 0x7B:  # {n}CRLF
            end = data.index(b"}\r\n", pos)
            size = int(data[pos + 1:end])
            start = end + 3
            items.append(data[start:start + size])
            pos = start + size
        else:
            start = pos
            depth = 0
            while pos < len(data):
                ch = data[pos]
                if ch == 0x5B:  # [ : a section, spaces and parentheses included
                    depth += 1
                elif ch == 0x5D:
                    depth -= 1
                elif depth == 0 and ch in (0x20, 0x28, 0x29):
                    break
                pos += 1
            word = data[start:pos].decode()
            items.append(None if word.upper() == "NIL" else Atom(word))
    assert closer is None, f"unclosed list in {data!r}"
    return items, pos


def fetch_results(reply: Reply) -> dict[int, dict[str, Any]]:
    """Sequence number → {ITEM NAME: value} from a reply's untagged FETCH responses.

    Several FETCH responses for one message are merged (later ones win)."""
    out: dict[int, dict[str, Any]] = {}
    for line in reply.lines("FETCH"):
        m = re.match(rb"\* (\d+) FETCH \(", line)
        assert m, line
        [items] = parse_data(line[m.end() - 1:])
        assert len(items) % 2 == 0, items
        values = out.setdefault(int(m.group(1)), {})
        for name, value in zip(items[::2], items[1::2], strict=True):
            values[str(name).upper()] = value
    return out


# --- servers and mail ----------------------------------------------------------------------




def make_message(subject: str = "hello", body: bytes = b"first line\r\nsecond line\r\n",
                 extra_headers: bytes = b"") -> bytes:
    head = (f"From: Sender <{SENDER}>\r\n"
            "To: <somebody@example.test>\r\n"
            f"Subject: {subject}\r\n"
            f"Message-ID: <{time.monotonic_ns()}@client.test>\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n").encode()
    return head + extra_headers + b"\r\n" + body


def deliver(server: Mailsuite, address: str, raw: bytes) -> bytes:
    """Send `raw` through the MX to `address`; returns the bytes the store keeps for it."""
    before = len(server.inbox(address))
    with smtplib.SMTP(*server.mx, timeout=30) as smtp:
        assert smtp.sendmail(SENDER, [address], raw) == {}
    stored = server.inbox(address)
    assert len(stored) == before + 1
    assert stored[-1].endswith(raw)
    return stored[-1]


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


# =========================================================================== fixtures
@pytest.fixture(scope="module")
def plain_server(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """A server of this module's own: LOGIN without TLS allowed, two sessions per account."""
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory, "imap-session",
                          {"auth": {"allow_plaintext": True},
                           "imap": {"max_connections_per_account": 2}})


@pytest.fixture(scope="module")
def capped_server(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """A server that takes two connections per client address."""
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory, "imap-capped",
                          {"imap": {"max_connections_per_ip": 2}})


# =========================================================================== capabilities
def test_greeting_is_ok_and_names_the_same_capabilities_as_the_capability_command(
        mailsuite: Mailsuite) -> None:
    with session(mailsuite, via="plain") as client:
        assert client.greeting.startswith(b"* OK [CAPABILITY ")
        assert capabilities(client.greeting) == ask_capabilities(client)


def test_without_tls_capability_offers_starttls_and_logindisabled_but_no_auth(
        mailsuite: Mailsuite) -> None:
    with session(mailsuite, via="plain") as client:
        assert ask_capabilities(client) == BASE_CAPS | {"STARTTLS", "LOGINDISABLED"}


def test_after_starttls_capability_offers_auth_plain_and_neither_starttls_nor_logindisabled(
        mailsuite: Mailsuite) -> None:
    with session(mailsuite, via="starttls") as client:
        assert ask_capabilities(client) == BASE_CAPS | {"AUTH=PLAIN"}


def test_imaps_speaks_tls_from_the_first_byte_and_offers_auth_plain_without_starttls(
        mailsuite: Mailsuite) -> None:
    with session(mailsuite, via="imaps") as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert capabilities(client.greeting) == BASE_CAPS | {"AUTH=PLAIN"}
        assert ask_capabilities(client) == BASE_CAPS | {"AUTH=PLAIN"}
    address = mailsuite.new_account()
    with imaplib_session(mailsuite, address) as client:
        assert client.state == "AUTH"
    # No clear text is spoken on that port.
    with socket.create_connection(mailsuite.imaps, timeout=10) as sock:
        sock.sendall(b"a CAPABILITY\r\n")
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            assert not sock.recv(100).startswith(b"* ")


def test_with_plaintext_allowed_auth_plain_is_offered_without_tls(
        plain_server: Mailsuite) -> None:
    with session(plain_server, via="plain") as client:
        assert capabilities(client.greeting) == BASE_CAPS | {"STARTTLS", "AUTH=PLAIN"}
        assert ask_capabilities(client) == BASE_CAPS | {"STARTTLS", "AUTH=PLAIN"}


def test_after_login_capability_lists_only_what_is_implemented_and_each_works(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, via="imaps") as client:
        login = client.login(address)
        assert capabilities(login.tagged) == BASE_CAPS  # RFC 3501 7.1: OK [CAPABILITY ...]
        assert ask_capabilities(client) == BASE_CAPS
        # Each advertised extension answers as its RFC says.
        assert client.ok('ID ("name" "pytest")').lines("ID")  # RFC 2971
        assert client.ok("ENABLE CONDSTORE").lines("ENABLED")  # RFC 5161
        assert client.ok("NAMESPACE").lines("NAMESPACE")  # RFC 2342
        listing = client.ok('LIST "" "*"').lines("LIST")
        assert any(b"\\Sent" in line for line in listing)  # SPECIAL-USE, RFC 6154
        assert all(b"Children" in line for line in listing)  # CHILDREN, RFC 3348
        uidvalidity, uid = client.append("INBOX", make_message())  # UIDPLUS + LITERAL+
        client.ok("SELECT INBOX")
        moved = client.ok(f"UID MOVE {uid} Archive")  # MOVE, RFC 6851
        assert any(b"COPYUID" in line for line in moved.untagged)
        client.ok("UNSELECT")  # RFC 3691
        idle = client.tag()
        client.send(f"{idle} IDLE\r\n")  # RFC 2177
        assert client.read().startswith(b"+ ")
        client.send("DONE\r\n")
        assert client.finish(idle).status == "OK"


# =========================================================================== logging in
def test_login_and_authenticate_are_refused_with_privacyrequired_before_tls(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, via="plain") as client:
        reply = client.command(f"LOGIN {quote(address)} {quote(PASSWORD)}")
        assert reply.status == "NO" and reply.code == "PRIVACYREQUIRED", reply
        reply = client.command(f"AUTHENTICATE PLAIN {plain_response('', address, PASSWORD)}")
        assert reply.status == "NO" and reply.code == "PRIVACYREQUIRED", reply
        assert client.command("SELECT INBOX").status == "BAD"  # still not authenticated
        client.ok("STARTTLS")
        client.starttls()
        client.login(address)
        client.ok("SELECT INBOX")


def test_login_with_the_right_password_works_without_tls_when_plaintext_is_allowed(
        plain_server: Mailsuite) -> None:
    address = plain_server.new_account()
    client = imaplib.IMAP4(*plain_server.imap, timeout=15)
    try:
        assert client.login(address.upper(), PASSWORD)[0] == "OK"  # user names ignore case
        assert client.select("INBOX") == ("OK", [b"0"])
        assert client.logout()[0] == "BYE"
    finally:
        with contextlib.suppress(OSError):
            client.shutdown()


def test_login_takes_its_arguments_as_synchronizing_literals(plain_server: Mailsuite) -> None:
    address = plain_server.new_account(password='with "quote" and \\ space')
    with session(plain_server, via="plain") as client:
        password = b'with "quote" and \\ space'
        client.send(f"a LOGIN {{{len(address)}}}\r\n")
        assert client.read().startswith(b"+ ")
        client.send(address.encode() + f" {{{len(password)}}}\r\n".encode())
        assert client.read().startswith(b"+ ")
        client.send(password + b"\r\n")
        assert client.finish("a").status == "OK"


def test_authenticate_plain_with_an_initial_response_logs_in(plain_server: Mailsuite) -> None:
    address = plain_server.new_account()
    with session(plain_server, via="plain") as client:
        tag = client.tag()
        client.send(f"{tag} AUTHENTICATE PLAIN {plain_response('', address, PASSWORD)}\r\n")
        reply = client.finish(tag)  # RFC 4959: no continuation when the response came along
        assert reply.status == "OK" and reply.untagged == [], reply
        assert capabilities(reply.tagged) == BASE_CAPS
        client.ok("SELECT INBOX")


def test_authenticate_plain_without_initial_response_gets_an_empty_continuation(
        plain_server: Mailsuite) -> None:
    address = plain_server.new_account()
    with session(plain_server, via="plain") as client:
        client.send("a AUTHENTICATE PLAIN\r\n")
        assert client.read() == b"+ "  # RFC 4616: PLAIN has an empty initial challenge
        client.send(plain_response("", address, PASSWORD) + "\r\n")
        assert client.finish("a").status == "OK"
        client.ok("SELECT INBOX")


def test_authenticate_cancelled_with_a_star_is_bad_and_the_session_goes_on(
        plain_server: Mailsuite) -> None:
    address = plain_server.new_account()
    with session(plain_server, via="plain") as client:
        client.send("a AUTHENTICATE PLAIN\r\n")
        assert client.read().startswith(b"+")
        client.send("*\r\n")
        assert client.finish("a").status == "BAD"  # RFC 3501 6.2.2
        assert client.command("SELECT INBOX").status == "BAD"  # not authenticated
        client.login(address)


def test_authenticate_with_an_unsupported_mechanism_is_no(plain_server: Mailsuite) -> None:
    with session(plain_server, via="plain") as client:
        reply = client.command("AUTHENTICATE CRAM-MD5")
        assert reply.status == "NO", reply
        assert client.quiet()  # no continuation for a mechanism it does not have
        client.ok("NOOP")


def test_authenticate_plain_for_a_foreign_authorization_identity_is_refused(
        plain_server: Mailsuite) -> None:
    domain = plain_server.new_domain()
    victim, attacker = plain_server.new_account(domain), plain_server.new_account(domain)
    with session(plain_server, via="plain") as client:
        reply = client.command(f"AUTHENTICATE PLAIN {plain_response(victim, attacker, PASSWORD)}")
        assert reply.status == "NO", reply
        assert client.command("SELECT INBOX").status == "BAD"
        # The user's own name as authzid is no foreign identity.
        reply = client.command(f"AUTHENTICATE PLAIN {plain_response(attacker, attacker, PASSWORD)}")
        assert reply.status == "OK", reply


def test_wrong_password_is_no_authenticationfailed_after_a_delay_that_grows(
        plain_server: Mailsuite) -> None:
    address = plain_server.new_account()
    with session(plain_server, via="plain") as client:
        client.login(address)  # a success forgets earlier failures from this address
    with session(plain_server, via="plain") as client:
        unknown = f"nobody@{plain_server.new_domain()}"
        delays = []
        # A wrong password, then an unknown user: refused alike, the second more slowly.
        for user, password in ((address, "wrong horse"), (unknown, PASSWORD)):
            start = time.monotonic()
            reply = client.command(f"LOGIN {quote(user)} {quote(password)}")
            delays.append(time.monotonic() - start)
            assert reply.status == "NO" and reply.code == "AUTHENTICATIONFAILED", reply
        assert delays[0] >= 0.3, delays
        assert delays[1] > delays[0] * 1.5, delays
        client.login(address)  # and the right password still works


# =========================================================================== STARTTLS
def test_starttls_discards_commands_pipelined_in_plaintext(mailsuite: Mailsuite) -> None:
    # RFC 3501 6.2.1 (and the STARTTLS command injection attacks): nothing the client sent
    # before the TLS handshake may be executed after it.
    address = mailsuite.new_account()
    with session(mailsuite, via="plain") as client:
        client.send(f"a STARTTLS\r\nb LOGIN {quote(address)} {quote(PASSWORD)}\r\n"
                    "c NOOP\r\n")
        assert client.read().startswith(b"a OK")
        client.starttls()
        reply = client.command("SELECT INBOX")
        assert reply.status == "BAD", reply  # the injected LOGIN did not happen
        assert not any(line.startswith((b"b ", b"c ")) for line in reply.untagged), reply
        assert client.quiet()
        client.login(address)


def test_starttls_is_bad_once_tls_is_active(mailsuite: Mailsuite) -> None:
    for via in ("starttls", "imaps"):
        with session(mailsuite, via=via) as client:
            assert client.command("STARTTLS").status == "BAD"
            client.ok("NOOP")  # still a working TLS session


# =========================================================================== any state
def test_id_answers_with_the_server_name_whatever_the_client_sends(
        mailsuite: Mailsuite) -> None:
    with session(mailsuite) as client:
        for argument in ("NIL", '("name" "pytest" "version" "1")'):
            [line] = client.ok(f"ID {argument}").lines("ID")
            [params] = parse_data(line[len(b"* ID "):])
            assert dict(zip(params[::2], params[1::2], strict=True))[b"name"] == b"mailsuite"


def test_namespace_is_one_personal_namespace_with_slash_as_delimiter(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address=address) as client:
        reply = client.ok("NAMESPACE")
        assert reply.lines("NAMESPACE") == [b'* NAMESPACE (("" "/")) NIL NIL']


def test_enable_answers_enabled_and_needs_an_argument(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address=address) as client:
        reply = client.ok("ENABLE SOMETHING-UNKNOWN")
        # RFC 5161 3.2: only what was enabled (nothing here) is listed.
        assert reply.lines("ENABLED") == [b"* ENABLED"]
        assert client.command("ENABLE").status == "BAD"


def test_noop_is_ok_in_every_state(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite) as client:
        client.ok("NOOP")
        client.login(address)
        client.ok("NOOP")
        client.ok("SELECT INBOX")
        assert client.ok("NOOP").untagged == []  # nothing happened meanwhile


def test_logout_sends_bye_then_the_tagged_ok_then_closes(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    for logged_in in (False, True):
        with session(mailsuite, address=address if logged_in else None) as client:
            client.send("z LOGOUT\r\n")
            assert client.read().startswith(b"* BYE ")
            assert client.read().startswith(b"z OK")
            assert client.read_until_closed(wait=5) == []


def test_commands_in_the_wrong_state_are_bad_and_change_nothing(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite) as client:
        for command in ("SELECT INBOX", 'LIST "" "*"', "FETCH 1 FLAGS", "IDLE", "NAMESPACE",
                        "CREATE Foo", "CLOSE", "ENABLE IDLE"):
            assert client.command(command).status == "BAD", command
        client.login(address)
        for command in ("FETCH 1 FLAGS", "STORE 1 +FLAGS (\\Seen)", "SEARCH ALL", "EXPUNGE",
                        "CLOSE", "UNSELECT", "UID FETCH 1 FLAGS", "COPY 1 Trash", "CHECK",
                        f"LOGIN {quote(address)} {quote(PASSWORD)}", "STARTTLS",
                        f"AUTHENTICATE PLAIN {plain_response('', address, PASSWORD)}"):
            assert client.command(command).status == "BAD", command
        client.ok("SELECT INBOX")
        reply = client.command(f"LOGIN {quote(address)} {quote(PASSWORD)}")
        assert reply.status == "BAD", reply
        assert client.ok('LIST "" "Foo"').untagged == []  # the early CREATE did nothing


def test_unknown_command_is_bad_and_the_session_goes_on(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite) as client:
        assert client.command("FROBNICATE now").status == "BAD"
        client.login(address)
        assert client.command("XYZZY").status == "BAD"
        assert client.command("UID FROBNICATE 1").status == "BAD"
        client.ok("SELECT INBOX")


def test_a_command_with_wrong_arguments_is_bad_and_the_session_goes_on(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite) as client:
        for command in ("CAPABILITY now", "LOGIN onlyauser", "STARTTLS please",
                        "AUTHENTICATE PLAIN (x)", "LOGOUT later"):
            reply = client.command(command)
            assert reply.status == "BAD", (command, reply)
        client.login(address)
        for command in ("NAMESPACE x", "ENABLE", "SELECT", "CREATE"):
            reply = client.command(command)
            assert reply.status == "BAD", (command, reply)
        client.ok("SELECT INBOX")
        for command in ("UNSELECT x", "FETCH 1", "STORE 1 FLAGS"):
            reply = client.command(command)
            assert reply.status == "BAD", (command, reply)
        client.ok("NOOP")


def test_a_line_without_a_valid_tag_is_answered_with_untagged_bad(mailsuite: Mailsuite) -> None:
    with session(mailsuite) as client:
        client.send("\r\n")
        assert client.read().startswith(b"* BAD")
        # A tag may not hold "+" (RFC 3501 9); the answer must not look like a continuation.
        client.send("+plus NOOP\r\n")
        assert client.read().startswith(b"* BAD")
        client.ok("NOOP")


# =========================================================================== timers and limits
def test_idle_connection_is_logged_out_with_bye_after_the_idle_timeout(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"imap": {"idle_timeout": 1.0}})
    with session(server) as client:
        start = time.monotonic()
        rest = client.read_until_closed(wait=10)
        elapsed = time.monotonic() - start
        assert rest is not None, "still open 10 s after a 1 s idle timeout"
        assert 0.8 <= elapsed < 5, elapsed
        assert len(rest) == 1 and rest[0].startswith(b"* BYE "), rest
    address = server.new_account()
    with session(server, address) as client:  # a command resets the timer
        for _ in range(3):
            time.sleep(0.45)
            client.ok("NOOP")


def test_connections_past_the_per_ip_cap_get_bye_and_are_closed(
        capped_server: Mailsuite) -> None:
    first, second = Wire(capped_server.imap), Wire(capped_server.imap)
    try:
        assert first.greeting.startswith(b"* OK") and second.greeting.startswith(b"* OK")
        with Wire(capped_server.imap) as third:
            assert third.greeting.startswith(b"* BYE "), third.greeting
            assert third.read_until_closed(wait=5) == []
        first.ok("NOOP")  # the others are unaffected
        first.send("z LOGOUT\r\n")
        assert first.read_until_closed() is not None

        def greeted() -> bool:
            with Wire(capped_server.imap) as fourth:
                return fourth.greeting.startswith(b"* OK")

        assert wait_for(greeted), "the slot of a closed connection was not given back"
    finally:
        first.close()
        second.close()


def test_the_per_ip_cap_counts_imap_and_imaps_connections_together(
        capped_server: Mailsuite) -> None:
    first, second = Wire(capped_server.imaps, tls=True), Wire(capped_server.imaps, tls=True)
    try:
        assert first.greeting.startswith(b"* OK") and second.greeting.startswith(b"* OK")
        with Wire(capped_server.imap) as third:
            assert third.greeting.startswith(b"* BYE "), third.greeting
    finally:
        first.close()
        second.close()


def test_logins_past_the_per_account_cap_are_no_limit_and_others_log_in(
        plain_server: Mailsuite) -> None:
    domain = plain_server.new_domain()
    address, other = plain_server.new_account(domain), plain_server.new_account(domain)
    with session(plain_server, address, via="plain"), \
            session(plain_server, address, via="plain") as second:
        with session(plain_server, via="plain") as third:
            reply = third.command(f"LOGIN {quote(address)} {quote(PASSWORD)}")
            assert reply.status == "NO" and reply.code == "LIMIT", reply
            assert third.command("SELECT INBOX").status == "BAD"
            third.login(other)  # the cap is per account
        second.send("z LOGOUT\r\n")
        assert second.read_until_closed() is not None

        def logged_in() -> bool:
            with session(plain_server, via="plain") as fourth:
                return fourth.command(
                    f"LOGIN {quote(address)} {quote(PASSWORD)}").status == "OK"

        assert wait_for(logged_in), "the account's slot was not given back after LOGOUT"


def test_the_per_account_cap_counts_imap_and_imaps_sessions_together(
        plain_server: Mailsuite) -> None:
    address = plain_server.new_account()
    with session(plain_server, address, via="imaps"), \
            session(plain_server, address, via="imaps"), \
            session(plain_server, via="plain") as third:
        reply = third.command(f"LOGIN {quote(address)} {quote(PASSWORD)}")
        assert reply.status == "NO" and reply.code == "LIMIT", reply


def test_a_login_whose_connection_is_gone_keeps_no_account_slot(
        plain_server: Mailsuite) -> None:
    address = plain_server.new_account()
    for _ in range(4):  # twice the cap
        with Wire(plain_server.imap) as client:
            client.send(f"a LOGIN {quote(address)} {quote(PASSWORD)}\r\n")
        # closed at once, before the login's answer
    time.sleep(0.5)

    def logged_in() -> bool:
        with session(plain_server, via="plain") as client:
            return client.command(f"LOGIN {quote(address)} {quote(PASSWORD)}").status == "OK"

    assert wait_for(logged_in), "sessions that were gone before their login ended hold slots"


def test_a_line_longer_than_max_line_is_bad_and_the_session_goes_on(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address=address) as client:
        client.send("a SELECT " + "x" * 70_000 + "\r\n")  # max_line is 65536 by default
        line = client.read()
        assert line.startswith((b"* BAD", b"a BAD")), line
        assert client.quiet()
        client.ok("SELECT INBOX")


def test_a_literal_larger_than_32_bits_is_refused_without_continuation(
        mailsuite: Mailsuite) -> None:
    with session(mailsuite) as client:
        client.send("a LOGIN {4294967296}\r\n")
        line = client.read()
        assert line.startswith((b"a BAD", b"a NO")), line
        assert client.quiet()  # no "+" continuation either
        client.ok("NOOP")
        assert ask_capabilities(client)


def test_a_synchronizing_literal_above_max_literal_is_bad_without_continuation(
        mailsuite: Mailsuite) -> None:
    with session(mailsuite) as client:
        client.send("a LOGIN {70000}\r\n")  # imap.max_literal is 65536
        line = client.read()
        assert line.startswith((b"a BAD", b"a NO")), line
        assert client.quiet()
        client.ok("NOOP")


def test_a_huge_non_synchronizing_literal_gets_bad_and_bye_and_the_connection_closes(
        mailsuite: Mailsuite) -> None:
    with session(mailsuite) as client:
        client.send("a LOGIN {99999999+}\r\n" + "x" * 1000)
        rest = client.read_until_closed(wait=10)
        assert rest is not None, "the connection stayed open"
        assert len(rest) == 2, rest
        assert rest[0].startswith(b"a BAD [TOOBIG]") and rest[1].startswith(b"* BYE"), rest
