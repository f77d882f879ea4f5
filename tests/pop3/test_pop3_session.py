"""POP3 sessions against the running service: greeting, CAPA, STLS and implicit TLS, logins
(USER/PASS, AUTH PLAIN per RFC 5034), failed-login delays, the maildrop lock, the autologout
timer and the per-address connection limit (RFC 1939, 2449, 2595, 3206, 5034).

The helpers at the top are shared with test_pop3_maildrop.py and the e2e tests.
"""

from __future__ import annotations

import base64
import contextlib
import poplib
import secrets
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailsuite.store import Delivery
from tests.dnsserver import DNSServerHandle
from tests.harness import Mailsuite, own_server, wait_listening

PASSWORD = "correct horse"
SENDER = "a@spf-pass.test"
# Everything the server may announce (RFC 2449 6, RFC 2595 4, RFC 3206, RFC 5034).
BASE_CAPS = {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
             "IMPLEMENTATION"}
LOGIN_CAPS = {"USER", "SASL PLAIN"}


# --------------------------------------------------------------------------- helpers




@pytest.fixture(scope="module")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """This module's own server (see own_server); allow_plaintext is false, as by default."""
    yield from own_server(backend, new_db_url, dns_server.address, tmp_path_factory,
                          "pop3-session")


def cert_path(server: Mailsuite) -> Path:
    """The self-signed certificate the server generated in its data_dir at first start."""
    return server.workdir / "var" / "tls" / "selfsigned-cert.pem"


def tls_context(server: Mailsuite) -> ssl.SSLContext:
    """Trusts exactly the server's own certificate (its name is not 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(cert_path(server)))
    context.check_hostname = False
    return context




def restart(server: Mailsuite) -> None:
    """server.stop(); server.start(), and make sure the new process listens on every port."""
    server.stop()
    server.start()
    wait_listening(server.pop3)
    wait_listening(server.pop3s)
    wait_listening(server.mx)


def open_client(server: Mailsuite, via: str = "pop3s", timeout: float = 30.0) -> poplib.POP3:
    """A greeted poplib client: "pop3s" (implicit TLS), "stls" or "plain" (port pop3)."""
    if via == "pop3s":
        return poplib.POP3_SSL(*server.pop3s, timeout=timeout, context=tls_context(server))
    client = poplib.POP3(*server.pop3, timeout=timeout)
    if via == "stls":
        client.stls(tls_context(server))
    else:
        assert via == "plain", via
    return client


def login(client: poplib.POP3, address: str, password: str = PASSWORD,
          in_use_grace: float = 5.0) -> bytes:
    """USER/PASS; retries a moment while the maildrop lock of a previous session lingers.

    The lock of a session that just ended is released after its connection closes, so a
    test that logs in again at once may meet [IN-USE] briefly. The tests of the lock itself
    (test_pop3_session.py) never go through this grace period.
    """
    deadline = time.monotonic() + in_use_grace
    while True:
        client.user(address)
        try:
            return client.pass_(password)
        except poplib.error_proto as exc:
            if b"[IN-USE]" not in exc.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def pop_session(server: Mailsuite, address: str | None = None, via: str = "pop3s",
                password: str = PASSWORD) -> Iterator[poplib.POP3]:
    """A poplib client, logged in when `address` is given; its socket is closed at the end."""
    client = open_client(server, via)
    try:
        if address is not None:
            login(client, address, password)
        yield client
    finally:
        client.close()


def make_message(subject: str = "hello", body: bytes = b"first line\r\nsecond line\r\n",
                 extra_headers: bytes = b"") -> bytes:
    """A CRLF message with a unique Message-ID."""
    head = (f"From: Sender <{SENDER}>\r\n"
            "To: <somebody@example.test>\r\n"
            f"Subject: {subject}\r\n"
            f"Message-ID: <{secrets.token_hex(10)}@client.test>\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n").encode()
    return head + extra_headers + b"\r\n" + body


def message_id(raw: bytes) -> str:
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(f"no Message-ID in {raw[:200]!r}")


def smtp_deliver(server: Mailsuite, address: str, raw: bytes) -> bytes:
    """Send `raw` to the MX for `address`; returns the bytes as the store keeps them."""
    before = len(server.inbox(address))
    with smtplib.SMTP(*server.mx, timeout=30) as smtp:
        assert smtp.sendmail(SENDER, [address], raw) == {}
    stored = server.inbox(address)
    assert len(stored) == before + 1
    assert stored[-1].endswith(raw if raw.endswith(b"\r\n") else raw + b"\r\n")
    return stored[-1]


def store_deliver(server: Mailsuite, address: str, raw: bytes) -> int:
    """Put `raw` into the INBOX through the store, byte for byte; returns its UID."""
    account = server.store.account_get(address)
    assert account is not None
    delivered = server.store.deliver(Delivery(raw, (account.id,)))
    return delivered.uids[0][1]


def plain_response(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


class RawPOP3:
    """A socket POP3 client for what poplib hides: the exact wire bytes, pipelining, TLS."""

    def __init__(self, address: tuple[str, int], timeout: float = 15.0,
                 context: ssl.SSLContext | None = None) -> None:
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection(address, timeout=timeout)
        if context is not None:
            self.sock = context.wrap_socket(self.sock)
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read what the server sent next into the buffer; False at EOF."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            data = b""
        self.buffer += data
        return bool(data)

    def line(self) -> bytes:
        """One response line with its line end; ConnectionError at EOF."""
        while (end := self.buffer.find(b"\n")) < 0:
            if not self._fill():
                raise ConnectionError(f"connection closed by the server after "
                                      f"{bytes(self.buffer)!r}")
        data = bytes(self.buffer[:end + 1])
        del self.buffer[:end + 1]
        return data

    def status(self) -> str:
        return self.line().decode("utf-8", "replace").rstrip("\r\n")

    def cmd(self, command: str | bytes) -> str:
        self.send((command if isinstance(command, bytes) else command.encode()) + b"\r\n")
        return self.status()

    def multiline(self) -> bytes:
        """The rest of a multi-line response, exactly as sent, up to and including ".CRLF"."""
        data = bytearray()
        while True:
            line = self.line()
            data += line
            if line == b".\r\n":
                return bytes(data)

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buffer, f"unread plaintext before TLS: {bytes(self.buffer)!r}"
        self.sock = context.wrap_socket(self.sock)

    def quiet(self, wait: float = 0.5) -> bool:
        """True when nothing more arrives within `wait` seconds (EOF counts as quiet)."""
        if self.buffer:
            return False
        self.sock.settimeout(wait)
        try:
            return not self._fill()
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(self.timeout)

    def read_until_closed(self, wait: float = 10.0) -> bytes | None:
        """Everything up to the server's close within `wait` seconds; None if still open."""
        deadline = time.monotonic() + wait
        try:
            while True:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not self._fill():
                    data = bytes(self.buffer)
                    self.buffer.clear()
                    return data
        except TimeoutError:
            return None
        except OSError:
            data = bytes(self.buffer)
            self.buffer.clear()
            return data
        finally:
            self.sock.settimeout(self.timeout)

    def closed(self, wait: float = 10.0) -> bool:
        """True when the server closes the connection within `wait` seconds."""
        return self.read_until_closed(wait) is not None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def raw_session(server: Mailsuite, via: str = "pop3s",
                address: str | None = None) -> Iterator[RawPOP3]:
    """A greeted RawPOP3 on pop3s (implicit TLS), "stls" or "plain"; logged in if asked."""
    if via == "pop3s":
        client = RawPOP3(server.pop3s, context=tls_context(server))
    else:
        client = RawPOP3(server.pop3)
    try:
        assert client.status().startswith("+OK")
        if via == "stls":
            assert client.cmd("STLS").startswith("+OK")
            client.starttls(tls_context(server))
        if address is not None:
            deadline = time.monotonic() + 5
            while True:
                assert client.cmd(f"USER {address}").startswith("+OK")
                answer = client.cmd(f"PASS {PASSWORD}")
                if "[IN-USE]" not in answer or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert answer.startswith("+OK"), answer
        yield client
    finally:
        client.close()


def capabilities(client: poplib.POP3) -> set[str]:
    """CAPA as a set of "NAME param ..." strings."""
    return {" ".join([name, *params]) for name, params in client.capa().items()}


def offered(caps: set[str]) -> set[str]:
    """The capability names and parameters, IMPLEMENTATION's free text left out."""
    return {"IMPLEMENTATION" if cap.startswith("IMPLEMENTATION ") else cap for cap in caps}


def err(call: Callable[[], object]) -> str:
    """Run a poplib call that must fail with -ERR; return the response text."""
    with pytest.raises(poplib.error_proto) as info:
        call()
    text = info.value.args[0]
    text = text.decode() if isinstance(text, bytes) else str(text)
    assert text.startswith("-ERR"), text
    return text


def timed(call: Callable[[], object]) -> tuple[float, object]:
    start = time.monotonic()
    try:
        result: object = call()
    except poplib.error_proto as exc:
        result = exc
    return time.monotonic() - start, result


# -------------------------------------------------------------------- greeting, CAPA


def test_server_greets_with_ok(mailsuite: Mailsuite) -> None:
    with pop_session(mailsuite, via="plain") as client:
        assert client.getwelcome().startswith(b"+OK")


def test_capa_before_tls_offers_stls_but_no_login_without_allow_plaintext(
        mailsuite: Mailsuite) -> None:
    with pop_session(mailsuite, via="plain") as client:
        caps = capabilities(client)
    assert offered(caps) == BASE_CAPS | {"STLS"}
    assert any(cap.startswith("IMPLEMENTATION ") for cap in caps)


def test_capa_after_stls_offers_user_and_sasl_plain_and_no_longer_stls(
        mailsuite: Mailsuite) -> None:
    with pop_session(mailsuite, via="stls") as client:
        assert offered(capabilities(client)) == BASE_CAPS | LOGIN_CAPS


def test_capa_on_pop3s_offers_user_and_sasl_plain_but_not_stls(mailsuite: Mailsuite) -> None:
    with pop_session(mailsuite, via="pop3s") as client:
        assert offered(capabilities(client)) == BASE_CAPS | LOGIN_CAPS


def test_capabilities_announced_in_authorization_are_announced_in_transaction_too(
        mailsuite: Mailsuite) -> None:
    # RFC 2449 5: "Capabilities available in the AUTHORIZATION state MUST be announced in
    # both states." (USER and SASL are both "Announced states: both", RFC 2449 6.2, 6.3.)
    address = mailsuite.new_account()
    with pop_session(mailsuite, via="pop3s") as client:
        before = offered(capabilities(client))
        login(client, address)
        after = offered(capabilities(client))
        client.quit()
    assert before - after == set(), f"missing after login: {before - after}"


def test_capa_with_allow_plaintext_offers_login_and_stls_before_tls(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"auth": {"allow_plaintext": True}})
    with pop_session(server, via="plain") as client:
        assert offered(capabilities(client)) == BASE_CAPS | LOGIN_CAPS | {"STLS"}


# ------------------------------------------------------------------------- plaintext


def test_user_and_pass_are_refused_before_tls_without_allow_plaintext(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite()  # the default configuration: allow_plaintext = false
    address = server.new_account()
    with pop_session(server, via="plain") as client:
        assert "[AUTH]" in err(lambda: client.user(address))
        assert err(lambda: client.pass_(PASSWORD))
        assert err(client.stat)  # the right password did not open the maildrop
        assert client.capa()  # the session goes on
        client.quit()
    # The account is not locked or spoilt: the same credentials work over TLS.
    with pop_session(server, address, via="stls") as client:
        assert client.stat() == (0, 0)
        client.quit()


def test_auth_plain_is_refused_before_tls_without_allow_plaintext(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite()
    address = server.new_account()
    with raw_session(server, via="plain") as client:
        answer = client.cmd(f"AUTH PLAIN {plain_response('', address, PASSWORD)}")
        assert answer.startswith("-ERR [AUTH]"), answer
        answer = client.cmd("AUTH PLAIN")
        assert answer.startswith("-ERR"), answer  # no "+ " continuation either
        assert client.cmd("STAT").startswith("-ERR")
        assert client.cmd("QUIT").startswith("+OK")


def test_user_and_pass_log_in_without_tls_when_allow_plaintext_is_true(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"auth": {"allow_plaintext": True}})
    address = server.new_account()
    with pop_session(server, via="plain") as client:
        assert client.user(address).startswith(b"+OK")
        assert client.pass_(PASSWORD).startswith(b"+OK")
        assert client.stat() == (0, 0)
        client.quit()


# ---------------------------------------------------------------------------- logins


def test_user_and_pass_log_in_after_stls(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    store_deliver(mailsuite, address, make_message())
    with pop_session(mailsuite, via="stls") as client:
        assert client.user(address).startswith(b"+OK")
        assert client.pass_(PASSWORD).startswith(b"+OK")
        assert client.stat()[0] == 1
        client.quit()


def test_user_name_is_case_insensitive_and_commands_too(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with raw_session(mailsuite) as client:
        assert client.cmd(f"user {address.upper()}").startswith("+OK")
        assert client.cmd(f"pass {PASSWORD}").startswith("+OK")
        assert client.cmd("stat") == "+OK 0 0"
        assert client.cmd("quit").startswith("+OK")


def test_password_may_contain_spaces(mailsuite: Mailsuite) -> None:
    password = "  two  spaces inside "
    address = mailsuite.new_account(password=password)
    with raw_session(mailsuite) as client:
        assert client.cmd(f"USER {address}").startswith("+OK")
        assert client.cmd(f"PASS {password}").startswith("+OK")
        assert client.cmd("QUIT").startswith("+OK")


def test_pass_without_user_gets_err(mailsuite: Mailsuite) -> None:
    with raw_session(mailsuite) as client:
        assert client.cmd(f"PASS {PASSWORD}").startswith("-ERR")
        assert client.cmd("CAPA").startswith("+OK")
        client.multiline()


def test_auth_plain_with_initial_response_logs_in(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with raw_session(mailsuite) as client:
        answer = client.cmd(f"AUTH PLAIN {plain_response('', address, PASSWORD)}")
        assert answer.startswith("+OK"), answer
        assert client.cmd("STAT") == "+OK 0 0"
        assert client.cmd("QUIT").startswith("+OK")


def test_auth_plain_without_initial_response_gets_empty_challenge_then_logs_in(
        mailsuite: Mailsuite) -> None:
    # RFC 5034 4: the server answers with "+" SP and an empty (base64) challenge.
    address = mailsuite.new_account()
    with raw_session(mailsuite) as client:
        client.send(b"AUTH PLAIN\r\n")
        assert client.line() == b"+ \r\n"
        assert client.cmd(plain_response("", address, PASSWORD)).startswith("+OK")
        assert client.cmd("STAT") == "+OK 0 0"
        assert client.cmd("QUIT").startswith("+OK")


def test_auth_plain_cancelled_with_star_gets_err_and_session_goes_on(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with raw_session(mailsuite) as client:
        client.send(b"AUTH PLAIN\r\n")
        assert client.line().startswith(b"+ ")
        assert client.cmd("*").startswith("-ERR")
        assert client.cmd("STAT").startswith("-ERR")  # not logged in
        assert client.cmd(f"USER {address}").startswith("+OK")
        assert client.cmd(f"PASS {PASSWORD}").startswith("+OK")
        assert client.cmd("QUIT").startswith("+OK")


def test_auth_plain_with_a_foreign_authzid_is_refused(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    attacker, victim = mailsuite.new_account(domain), mailsuite.new_account(domain)
    store_deliver(mailsuite, victim, make_message())
    with raw_session(mailsuite) as client:
        answer = client.cmd(f"AUTH PLAIN {plain_response(victim, attacker, PASSWORD)}")
        assert answer.startswith("-ERR [AUTH]"), answer
        assert client.cmd("STAT").startswith("-ERR")
        client.send(b"AUTH PLAIN\r\n")
        assert client.line().startswith(b"+ ")
        answer = client.cmd(plain_response(victim, attacker, PASSWORD))
        assert answer.startswith("-ERR [AUTH]"), answer
        assert client.cmd("STAT").startswith("-ERR")
    assert len(mailsuite.inbox(victim)) == 1


def test_auth_plain_with_the_users_own_authzid_is_accepted(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with raw_session(mailsuite) as client:
        answer = client.cmd(f"AUTH PLAIN {plain_response(address.upper(), address, PASSWORD)}")
        assert answer.startswith("+OK"), answer
        assert client.cmd("QUIT").startswith("+OK")


def test_auth_plain_with_a_malformed_response_gets_err_and_session_goes_on(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with raw_session(mailsuite) as client:
        for bad in ("not-base64!", base64.b64encode(b"no nul bytes").decode(),
                    base64.b64encode(f"\0{address}\0".encode()).decode()):
            assert client.cmd(f"AUTH PLAIN {bad}").startswith("-ERR"), bad
        assert client.cmd("AUTH NOSUCHMECH").startswith("-ERR")
        assert client.cmd(f"AUTH PLAIN {plain_response('', address, PASSWORD)}").startswith(
            "+OK")
        assert client.cmd("QUIT").startswith("+OK")


def test_wrong_password_gets_err_auth_after_a_delay_that_grows(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    # A private server: the penalty is per client address and we must start from zero.
    server = start_mailsuite({"auth": {"allow_plaintext": True}})
    address = server.new_account()
    with pop_session(server, via="plain") as client:
        client.user(address)
        first, answer = timed(lambda: client.pass_("wrong password"))
        assert isinstance(answer, poplib.error_proto), answer
        assert answer.args[0].startswith(b"-ERR [AUTH]"), answer
        # Same penalty whatever the listener and mechanism: AUTH PLAIN on pop3s now.
        with raw_session(server, via="pop3s") as other:
            start = time.monotonic()
            answer2 = other.cmd(f"AUTH PLAIN {plain_response('', address, 'wrong again')}")
            second = time.monotonic() - start
        assert answer2.startswith("-ERR [AUTH]"), answer2
        assert first >= 0.4, f"first failure answered after {first:.3f}s: no delay"
        assert second > first + 0.25, (first, second)
        # The right password still works afterwards, in the same session.
        assert client.user(address).startswith(b"+OK")
        assert client.pass_(PASSWORD).startswith(b"+OK")
        client.quit()


def test_unknown_user_is_refused_exactly_like_a_wrong_password(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"auth": {"allow_plaintext": True}})
    domain = server.new_domain()
    with raw_session(server, via="plain") as client:
        assert client.cmd(f"USER nobody@{domain}").startswith("+OK")
        start = time.monotonic()
        answer = client.cmd("PASS whatever")
        elapsed = time.monotonic() - start
        assert answer == "-ERR [AUTH] authentication failed", answer
        assert elapsed >= 0.4, elapsed
        address = server.new_account(domain)
        assert client.cmd(f"USER {address}").startswith("+OK")
        assert client.cmd("PASS wrong password") == answer
        assert client.cmd("STAT").startswith("-ERR")


def test_pipelined_login_and_commands_are_answered_in_order(mailsuite: Mailsuite) -> None:
    # RFC 2449 6.6: with PIPELINING the client may send several commands in one write.
    address = mailsuite.new_account()
    store_deliver(mailsuite, address, make_message())
    with raw_session(mailsuite) as client:
        client.send(f"USER {address}\r\nPASS {PASSWORD}\r\nSTAT\r\nNOOP\r\nLIST 1\r\n"
                    "NOOP extra\r\nRSET\r\nQUIT\r\n".encode())
        assert client.status().startswith("+OK")  # USER
        assert client.status().startswith("+OK maildrop")  # PASS
        assert client.status().startswith("+OK 1 ")  # STAT
        assert client.status() == "+OK"  # NOOP
        assert client.status().startswith("+OK 1 ")  # LIST 1
        assert client.status().startswith("-ERR")  # NOOP extra
        assert client.status().startswith("+OK")  # RSET
        assert client.status().startswith("+OK")  # QUIT
        assert client.closed()


# ----------------------------------------------------------------------- STLS / pop3s


def test_stls_discards_plaintext_pipelined_after_it(start_mailsuite: Callable[..., Mailsuite],
                                                    ) -> None:
    # RFC 2595 4 (and the STARTTLS injection attacks): nothing received before the TLS
    # handshake may be executed after it.
    server = start_mailsuite()
    address = server.new_account()
    client = RawPOP3(server.pop3)
    try:
        assert client.status().startswith("+OK")
        client.send(f"STLS\r\nUSER {address}\r\nPASS {PASSWORD}\r\nCAPA\r\n".encode())
        assert client.status().startswith("+OK")
        client.starttls(tls_context(server))
        assert client.cmd("STAT").startswith("-ERR")  # the injected login did not happen
        assert client.quiet(), "the server answered the pipelined plaintext commands"
        assert client.cmd(f"USER {address}").startswith("+OK")
        assert client.cmd(f"PASS {PASSWORD}").startswith("+OK")
        assert client.cmd("QUIT").startswith("+OK")
    finally:
        client.close()


def test_stls_is_refused_once_tls_is_active(mailsuite: Mailsuite) -> None:
    with raw_session(mailsuite, via="stls") as client:
        assert client.cmd("STLS").startswith("-ERR")
        assert client.cmd("CAPA").startswith("+OK")  # still a working TLS session
        client.multiline()
    with raw_session(mailsuite, via="pop3s") as client:
        assert client.cmd("STLS").startswith("-ERR")
        assert client.cmd("CAPA").startswith("+OK")
        client.multiline()


def test_stls_with_an_argument_gets_err(mailsuite: Mailsuite) -> None:
    with raw_session(mailsuite, via="plain") as client:
        assert client.cmd("STLS now").startswith("-ERR")
        assert client.cmd("STLS").startswith("+OK")
        client.starttls(tls_context(mailsuite))
        assert client.cmd("NOOP").startswith("-ERR")  # AUTHORIZATION state, over TLS


def test_pop3s_speaks_tls_from_the_first_byte_with_the_servers_certificate(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with pop_session(mailsuite, address, via="pop3s") as client:
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        pem = cert_path(mailsuite).read_text()
        assert sock.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(pem)
        assert client.stat() == (0, 0)
        client.quit()
    # And nothing in clear text is spoken on that port.
    with socket.create_connection(mailsuite.pop3s, timeout=10) as sock:
        sock.sendall(b"CAPA\r\n")
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            assert not sock.recv(100).startswith(b"+OK")


# -------------------------------------------------------------------- maildrop lock


def test_second_session_gets_in_use_while_the_first_holds_the_maildrop(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    store_deliver(mailsuite, address, make_message())
    with pop_session(mailsuite, address, via="pop3s") as first:
        for via in ("pop3s", "stls"):
            with pop_session(mailsuite, via=via) as second:
                second.user(address)
                assert err(lambda s=second: s.pass_(PASSWORD)).startswith("-ERR [IN-USE]")
                assert err(second.stat)  # still in AUTHORIZATION
                with raw_session(mailsuite, via=via) as third:
                    answer = third.cmd(
                        f"AUTH PLAIN {plain_response('', address, PASSWORD)}")
                    assert answer.startswith("-ERR [IN-USE]"), answer
        assert first.stat()[0] == 1  # the holder is undisturbed
        first.quit()
    with pop_session(mailsuite, address) as again:  # free again after QUIT
        assert again.stat()[0] == 1
        again.quit()


def test_quit_releases_the_maildrop_lock_before_closing_the_connection(
        mailsuite: Mailsuite) -> None:
    # RFC 1939 6: after QUIT "the POP3 server then releases any exclusive-access lock on the
    # maildrop and closes the TCP connection". A client that saw the connection close may
    # log in again at once. Four accounts cycle in parallel, as busy clients would.
    accounts = [mailsuite.new_account() for _ in range(4)]
    refused: list[str] = []
    failures: list[BaseException] = []

    def cycle(address: str) -> None:
        try:
            for _ in range(50):
                with raw_session(mailsuite, via="pop3s") as client:
                    client.send(f"USER {address}\r\nPASS {PASSWORD}\r\n".encode())
                    assert client.status().startswith("+OK")
                    answer = client.status()
                    if "[IN-USE]" in answer:
                        refused.append(address)
                        time.sleep(0.2)  # let the old lock go before the next round
                        continue
                    assert answer.startswith("+OK"), answer
                    assert client.cmd("QUIT").startswith("+OK")
                    assert client.closed()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=cycle, args=(a,)) for a in accounts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert not refused, f"{len(refused)} of 200 logins right after a QUIT got [IN-USE]"


@pytest.mark.parametrize("via", ["plain", "stls", "pop3s"])
def test_quit_that_deletes_messages_releases_the_maildrop_lock_and_closes(
        start_mailsuite: Callable[..., Mailsuite], via: str) -> None:
    # RFC 1939 6, the UPDATE state: remove the marked messages, reply, release the lock and
    # close the connection -- over TLS as over plain TCP.
    server = start_mailsuite({"auth": {"allow_plaintext": True}})
    address = server.new_account()
    for i in range(2):
        store_deliver(server, address, make_message(f"message {i}"))
    with raw_session(server, via=via, address=address) as client:
        assert client.cmd("DELE 1").startswith("+OK")
        assert client.cmd("QUIT").startswith("+OK")
        assert client.closed(wait=5), "the server did not close the connection after QUIT"
    assert len(server.inbox(address)) == 1
    with pop_session(server, via=via) as again:
        assert login(again, address, in_use_grace=3).startswith(b"+OK")
        assert again.stat()[0] == 1
        again.quit()


def test_a_session_cut_by_a_server_restart_does_not_keep_the_maildrop_locked(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite()
    address = server.new_account()
    client = open_client(server, "pop3s")
    try:
        login(client, address)
        restart(server)  # a clean stop (SIGTERM) with the session still open
    finally:
        client.close()
    with pop_session(server, via="pop3s") as again:
        again.user(address)
        deadline = time.monotonic() + 10
        while True:  # allow for a lock release still under way, but not for the lease
            try:
                assert again.pass_(PASSWORD).startswith(b"+OK")
                break
            except poplib.error_proto as exc:
                assert b"[IN-USE]" in exc.args[0], exc
                assert time.monotonic() < deadline, (
                    "the maildrop is still locked 10 s after the restart")
                time.sleep(0.2)
                again.user(address)
        again.quit()


# -------------------------------------------------------------------- autologout timer


def test_idle_session_is_closed_by_the_autologout_timer(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"pop3": {"idle_timeout": 1.0}})
    client = RawPOP3(server.pop3s, context=tls_context(server))
    try:
        assert client.status().startswith("+OK")
        start = time.monotonic()
        data = client.read_until_closed(wait=10)
        elapsed = time.monotonic() - start
        assert data is not None, "still open 10 s after a 1 s idle timeout"
        assert 0.8 <= elapsed < 5, elapsed
        # RFC 1939 3 wants no response at all; a single -ERR line is tolerated.
        assert data == b"" or (data.startswith(b"-ERR") and data.count(b"\r\n") == 1), data
    finally:
        client.close()


def test_autologout_does_not_enter_the_update_state(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    # RFC 1939 3: "When the timer expires, the session does NOT enter the UPDATE state".
    server = start_mailsuite({"pop3": {"idle_timeout": 1.0}})
    address = server.new_account()
    store_deliver(server, address, make_message())
    with raw_session(server, address=address) as client:
        assert client.cmd("DELE 1").startswith("+OK")
        assert client.closed(wait=10)
    assert len(server.inbox(address)) == 1
    with pop_session(server, address) as again:
        assert again.stat()[0] == 1
        again.quit()


def test_any_command_resets_the_autologout_timer(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"pop3": {"idle_timeout": 1.5}})
    address = server.new_account()
    with raw_session(server, address=address) as client:
        for _ in range(8):  # 3.2 s in all, twice the timeout
            time.sleep(0.4)
            assert client.cmd("NOOP") == "+OK"
        assert client.cmd("QUIT").startswith("+OK")


# --------------------------------------------------------------- connections per IP


def test_connections_over_the_per_address_limit_are_refused(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"pop3": {"max_connections_per_ip": 2}})
    first, second = RawPOP3(server.pop3), RawPOP3(server.pop3)
    try:
        assert first.status().startswith("+OK")
        assert second.status().startswith("+OK")
        third = RawPOP3(server.pop3)
        try:
            assert third.status().startswith("-ERR [SYS/TEMP]")
            assert third.closed()
        finally:
            third.close()
        assert first.cmd("CAPA").startswith("+OK")  # the others are unaffected
        first.multiline()
        assert first.cmd("QUIT").startswith("+OK")
        assert first.closed()
        deadline = time.monotonic() + 5
        while True:  # the slot is free once the server has seen the close
            fourth = RawPOP3(server.pop3)
            try:
                greeting = fourth.status()
            finally:
                fourth.close()
            if greeting.startswith("+OK") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert greeting.startswith("+OK"), greeting
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("via", ["plain", "stls", "pop3s"])
def test_every_ended_session_gives_its_connection_slot_back(
        start_mailsuite: Callable[..., Mailsuite], via: str) -> None:
    # With one connection allowed per address, each session must find the slot of the one
    # before it free again, however that one ended.
    server = start_mailsuite({"pop3": {"max_connections_per_ip": 1},
                              "auth": {"allow_plaintext": True}})
    address = server.new_account()
    for i in range(3):
        store_deliver(server, address, make_message(f"message {i}"))

    def greeted(after: str) -> RawPOP3:
        deadline = time.monotonic() + 5
        while True:  # the server frees the slot when it sees the close, not before
            client = RawPOP3(server.pop3s if via == "pop3s" else server.pop3,
                             context=tls_context(server) if via == "pop3s" else None)
            greeting = client.status()
            if greeting.startswith("+OK") or time.monotonic() > deadline:
                break
            client.close()
            time.sleep(0.1)
        assert greeting.startswith("+OK"), f"after a session ended by {after}: {greeting}"
        if via == "stls":
            assert client.cmd("STLS").startswith("+OK")
            client.starttls(tls_context(server))
        return client

    endings = {
        "QUIT before login": ["QUIT"],
        "QUIT without DELE": ["USER", "PASS", "QUIT"],
        "QUIT after DELE": ["USER", "PASS", "DELE 1", "QUIT"],
        "failed login, QUIT": ["USER", "PASS wrong", "QUIT"],
        "hang-up after login": ["USER", "PASS"],
    }
    previous = "nothing"
    for ending, commands in endings.items():
        client = greeted(previous)
        previous = ending
        try:
            for command in commands:
                if command == "USER":
                    command = f"USER {address}"
                elif command == "PASS":
                    command = f"PASS {PASSWORD}"
                answer = client.cmd(command)
                if command == "PASS wrong":
                    assert answer.startswith("-ERR [AUTH]"), (ending, answer)
                else:
                    assert answer.startswith("+OK"), (ending, command, answer)
            if commands[-1] == "QUIT":
                assert client.closed(wait=5), f"{ending}: the server did not close"
        finally:
            client.close()
    last = greeted(previous)  # after all five endings, a sixth session is still let in
    last.close()


def test_per_address_limit_counts_pop3_and_pop3s_connections_together(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite({"pop3": {"max_connections_per_ip": 2}})
    plain = RawPOP3(server.pop3)
    secure = RawPOP3(server.pop3s, context=tls_context(server))
    try:
        assert plain.status().startswith("+OK")
        assert secure.status().startswith("+OK")
        extra = RawPOP3(server.pop3)
        try:
            assert extra.status().startswith("-ERR [SYS/TEMP]")
        finally:
            extra.close()
        # Over TLS the refusal could only be read after a handshake, which a flood of
        # connections would hold open: the server drops the connection at once instead.
        start = time.monotonic()
        with pytest.raises(OSError):
            RawPOP3(server.pop3s, context=tls_context(server)).status()
        assert time.monotonic() - start < 2
    finally:
        plain.close()
        secure.close()
