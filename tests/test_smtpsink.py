"""The test SMTP sink (tests/smtpsink.py) over real loopback sockets, with smtplib as client
and a raw client where smtplib cannot send what is needed."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.smtp.smtp_client import RawSMTP
from tests.smtpsink import (
    SinkServer,
    by_local_part,
    free_port_on,
    make_ca,
    make_certificate,
)

BODY = (b"From: a@sender.test\r\nTo: b@rcpt.test\r\nSubject: hello\r\n\r\n"
        b".a line starting with a dot\r\n..and one with two\r\n"
        b"8-bit: caf\xc3\xa9 \xff\r\n")


def no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def client(sink: SinkServer) -> smtplib.SMTP:
    return smtplib.SMTP(*sink.address, local_hostname="client.test", timeout=10)


def test_plain_delivery_is_recorded_byte_for_byte() -> None:
    with SinkServer() as sink, client(sink) as smtp:
        refused = smtp.sendmail("a@sender.test", ["b@rcpt.test"], BODY,
                                mail_options=["BODY=8BITMIME"])
        [msg] = sink.wait_for(1)
    assert refused == {}
    assert msg.data == BODY
    assert msg.wire == BODY.replace(b"\r\n.", b"\r\n..")  # smtplib dot-stuffed both lines
    assert (msg.mail_from, msg.rcpts) == ("a@sender.test", ["b@rcpt.test"])
    assert msg.mail_params == {"BODY": "8BITMIME"}
    assert (msg.tls, msg.auth_user, msg.ehlo, msg.peer) == (False, None, "client.test",
                                                             "127.0.0.1")
    assert msg.message["Subject"] == "hello"
    assert sink.connections == 1


def test_several_transactions_on_one_connection() -> None:
    with SinkServer() as sink, client(sink) as smtp:
        smtp.sendmail("a@sender.test", ["one@rcpt.test"], b"Subject: 1\r\n\r\none\r\n")
        smtp.sendmail("a@sender.test", ["two@rcpt.test"], b"Subject: 2\r\n\r\ntwo\r\n")
        messages = sink.wait_for(2)
    assert [m.rcpts for m in messages] == [["one@rcpt.test"], ["two@rcpt.test"]]
    assert messages[1].data == b"Subject: 2\r\n\r\ntwo\r\n"
    assert sink.connections == 1


def test_pipelined_commands_and_only_crlf_dot_crlf_ends_data() -> None:
    with SinkServer() as sink:
        raw = RawSMTP(sink.address)
        try:
            assert raw.greeting()[0] == 220
            raw.send(b"EHLO raw.test\r\nMAIL FROM:<a@sender.test>\r\n"
                     b"RCPT TO:<b@rcpt.test>\r\nRCPT TO:<c@rcpt.test>\r\nDATA\r\n")
            assert [raw.reply()[0] for _ in range(5)] == [250, 250, 250, 250, 354]
            # A "." after a bare LF is content, not the end (and not dot-stuffing).
            raw.send(b"one\n.\r\n..two\r\n.\r\nNOOP\r\n")
            assert raw.reply() == (250, "2.0.0 queued")
            assert raw.reply()[0] == 250  # the NOOP after the message
        finally:
            raw.close()
        [msg] = sink.wait_for(1)
    assert msg.wire == b"one\n.\r\n..two\r\n"
    assert msg.data == b"one\n.\r\n.two\r\n"
    assert msg.rcpts == ["b@rcpt.test", "c@rcpt.test"]


def test_per_recipient_replies_by_local_part() -> None:
    policy = by_local_part({"defer": (451, "4.2.0 try later"),
                            "reject": (550, "5.1.1 no such user")})
    with SinkServer(rcpt_reply=policy) as sink, client(sink) as smtp:
        refused = smtp.sendmail("a@sender.test",
                                ["ok@rcpt.test", "Defer@rcpt.test", "reject@rcpt.test"], BODY)
        [msg] = sink.wait_for(1)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("a@sender.test", ["reject@rcpt.test"], BODY)
    assert refused == {"Defer@rcpt.test": (451, b"4.2.0 try later"),
                       "reject@rcpt.test": (550, b"5.1.1 no such user")}
    assert msg.rcpts == ["ok@rcpt.test"]
    assert sink.rcpt_log == [("ok@rcpt.test", 250), ("Defer@rcpt.test", 451),
                             ("reject@rcpt.test", 550), ("reject@rcpt.test", 550)]
    assert len(sink.messages) == 1


def test_mail_and_data_replies() -> None:
    with SinkServer(mail_reply=lambda addr: (451, "4.7.1 greylisted")) as sink:
        with client(sink) as smtp, pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("a@sender.test", ["b@rcpt.test"], BODY)
        assert refused.value.smtp_code == 451
        sink.mail_reply = None
        sink.data_reply = lambda data: (554, "5.7.1 looks like spam") if b"spam" in data \
            else (250, "2.0.0 fine")
        with client(sink) as smtp:
            with pytest.raises(smtplib.SMTPDataError) as rejected:
                smtp.sendmail("a@sender.test", ["b@rcpt.test"], b"Subject: spam\r\n\r\nx\r\n")
            smtp.sendmail("a@sender.test", ["b@rcpt.test"], BODY)
        [msg] = sink.wait_for(1)
    assert rejected.value.smtp_code == 554
    assert msg.data == BODY


def test_starttls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert_key = make_certificate(tmp_path, "sink.test")
    with SinkServer(starttls=cert_key) as sink, client(sink) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        assert smtp.starttls(context=no_verify())[0] == 220
        smtp.ehlo()
        assert not smtp.has_extn("starttls")
        smtp.sendmail("a@sender.test", ["b@rcpt.test"], BODY)
        [msg] = sink.wait_for(1)
    assert msg.tls and msg.data == BODY


def test_starttls_discards_pipelined_plaintext_and_the_ehlo(tmp_path: Path) -> None:
    with SinkServer(starttls=make_certificate(tmp_path, "sink.test")) as sink:
        raw = RawSMTP(sink.address)
        try:
            raw.greeting()
            raw.cmd("EHLO raw.test")
            raw.send(b"STARTTLS\r\nMAIL FROM:<injected@sender.test>\r\n")
            assert raw.reply()[0] == 220
            raw.starttls()
            assert raw.cmd("MAIL FROM:<a@sender.test>")[0] == 503  # EHLO again first
            assert raw.cmd("EHLO raw.test")[0] == 250
        finally:
            raw.close()
    assert not any("injected" in command for command in sink.commands)


def test_starttls_with_a_ca_signed_certificate_verified_by_the_client(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    cert_key = make_certificate(tmp_path, "mx.example.test", ca=ca)
    verify = ssl.create_default_context(cafile=str(ca[0]))
    with SinkServer(starttls=cert_key) as sink:
        raw = RawSMTP(sink.address)
        try:
            raw.greeting()
            raw.cmd("EHLO raw.test")
            assert raw.cmd("STARTTLS")[0] == 220
            raw.sock = verify.wrap_socket(raw.sock, server_hostname="mx.example.test")
            raw.file = raw.sock.makefile("rb")
            assert "STARTTLS" not in raw.cmd("EHLO raw.test")[1]
            assert raw.cmd("MAIL FROM:<a@sender.test>")[0] == 250
            assert raw.cmd("RCPT TO:<b@rcpt.test>")[0] == 250
            assert raw.cmd("DATA")[0] == 354
            assert raw.cmd(b"Subject: verified\r\n\r\nhi\r\n.")[0] == 250
        finally:
            raw.close()
        [msg] = sink.wait_for(1)
        assert msg.tls and msg.ehlo == "raw.test"

        # The same client refuses the certificate for another name.
        raw = RawSMTP(sink.address)
        try:
            raw.greeting()
            raw.cmd("EHLO raw.test")
            raw.cmd("STARTTLS")
            with pytest.raises(ssl.SSLCertVerificationError):
                verify.wrap_socket(raw.sock, server_hostname="other.example.test")
        finally:
            raw.close()


def test_implicit_tls(tmp_path: Path) -> None:
    cert_key = make_certificate(tmp_path, "sink.test")
    with SinkServer(implicit_tls=cert_key, starttls=cert_key) as sink:
        with smtplib.SMTP_SSL(*sink.address, context=no_verify(), timeout=10) as smtp:
            smtp.ehlo()
            assert not smtp.has_extn("starttls")
            smtp.sendmail("a@sender.test", ["b@rcpt.test"], BODY)
        [msg] = sink.wait_for(1)
        # A plaintext client gets no SMTP greeting from a TLS listener.
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            smtplib.SMTP(*sink.address, timeout=0.5)
    assert msg.tls and msg.data == BODY


@pytest.mark.parametrize(("mechanism", "initial_response"),
                         [("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False)])
def test_auth_is_required_before_mail(mechanism: str, initial_response: bool) -> None:
    with SinkServer(auth=("alice", "s3cret"), auth_plaintext=True) as sink, \
            client(sink) as smtp:
        smtp.ehlo()
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert smtp.mail("a@sender.test")[0] == 530
        smtp.user, smtp.password = "alice", "wrong"
        authobject = getattr(smtp, f"auth_{mechanism.lower()}")
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            smtp.auth(mechanism, authobject, initial_response_ok=initial_response)
        assert bad.value.smtp_code == 535
        smtp.password = "s3cret"
        assert smtp.auth(mechanism, authobject, initial_response_ok=initial_response)[0] == 235
        smtp.sendmail("a@sender.test", ["b@rcpt.test"], BODY)
        [msg] = sink.wait_for(1)
    assert msg.auth_user == "alice"


def test_auth_is_offered_only_after_starttls(tmp_path: Path) -> None:
    cert_key = make_certificate(tmp_path, "sink.test")
    with SinkServer(auth=("alice", "s3cret"), starttls=cert_key) as sink, \
            client(sink) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        assert smtp.docmd("AUTH", "PLAIN AGFsaWNlAHMzY3JldA==")[0] == 538
        smtp.starttls(context=no_verify())
        smtp.ehlo()
        assert smtp.has_extn("auth")
        smtp.login("alice", "s3cret")
        smtp.sendmail("a@sender.test", ["b@rcpt.test"], BODY)
        [msg] = sink.wait_for(1)
    assert msg.tls and msg.auth_user == "alice"


def test_extensions_follow_the_options() -> None:
    with SinkServer(hostname="mx.sink.test") as sink, client(sink) as smtp:
        code, text = smtp.ehlo()
        assert text.decode().splitlines()[0] == "mx.sink.test greets client.test"
        assert {"pipelining", "8bitmime", "smtputf8"} <= set(smtp.esmtp_features)
        assert not smtp.has_extn("size") and not smtp.has_extn("starttls")
        assert smtp.mail("a@sender.test", ["SIZE=10"])[0] == 555  # SIZE not advertised

    with SinkServer(pipelining=False, eightbitmime=False, smtputf8=False, size=100) as sink, \
            client(sink) as smtp:
        smtp.ehlo()
        assert not {"pipelining", "8bitmime", "smtputf8"} & set(smtp.esmtp_features)
        assert smtp.esmtp_features["size"] == "100"
        assert smtp.mail("a@sender.test", ["BODY=8BITMIME"])[0] == 555
        assert smtp.mail("a@sender.test", ["SIZE=101"])[0] == 552
        # Declared within the limit, but bigger than declared:
        assert smtp.mail("a@sender.test", ["SIZE=50"])[0] == 250
        assert smtp.rcpt("b@rcpt.test")[0] == 250
        assert smtp.data(b"x" * 200)[0] == 552
        assert sink.messages == []


def test_smtputf8_addresses() -> None:
    with SinkServer() as sink, client(sink) as smtp:
        smtp.ehlo()
        smtp.sock.sendall("MAIL FROM:<jörg@sender.test>\r\n".encode())
        assert smtp.getreply()[0] == 553  # non-ASCII without SMTPUTF8
        smtp.sendmail("jörg@sender.test", ["zoë@rcpt.test"], BODY,
                      mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        [msg] = sink.wait_for(1)
    assert (msg.mail_from, msg.rcpts) == ("jörg@sender.test", ["zoë@rcpt.test"])
    assert msg.mail_params == {"SMTPUTF8": None, "BODY": "8BITMIME"}


def test_two_sinks_share_one_port_on_two_loopback_addresses() -> None:
    port = free_port_on(["127.0.0.2", "127.0.0.3"])
    with SinkServer("127.0.0.2", port, hostname="mx2") as mx2, \
            SinkServer("127.0.0.3", port, hostname="mx3") as mx3:
        assert (mx2.address, mx3.address) == (("127.0.0.2", port), ("127.0.0.3", port))
        for sink in (mx2, mx3):
            with client(sink) as smtp:
                smtp.sendmail("a@sender.test", [f"b@{sink.hostname}.test"], BODY)
        assert [m.rcpts for m in mx2.wait_for(1)] == [["b@mx2.test"]]
        assert [m.rcpts for m in mx3.wait_for(1)] == [["b@mx3.test"]]


def test_wait_for_times_out_with_an_assertion() -> None:
    with SinkServer() as sink:
        started = time.monotonic()
        with pytest.raises(AssertionError, match=r"expected 1 message\(s\) .* got 0"):
            sink.wait_for(1, timeout=0.3)
        assert time.monotonic() - started >= 0.3


def test_drop_after_data_closes_without_a_reply() -> None:
    with SinkServer(drop_after_data=True) as sink, client(sink) as smtp:
        with pytest.raises(smtplib.SMTPServerDisconnected):
            smtp.sendmail("a@sender.test", ["b@rcpt.test"], BODY)
        assert sink.messages == []
        assert [m.data for m in sink.dropped] == [BODY]


def test_delay_before_every_reply() -> None:
    with SinkServer(delay=0.3) as sink:
        started = time.monotonic()
        with client(sink) as smtp:
            assert time.monotonic() - started >= 0.3  # the greeting waited
            smtp.noop()
            assert time.monotonic() - started >= 0.6


def test_refusing_greeting() -> None:
    with SinkServer(greeting=(554, "5.3.2 no service")) as sink, \
            pytest.raises(smtplib.SMTPConnectError) as refused:
        client(sink)
    assert refused.value.smtp_code == 554


def test_stop_closes_open_connections_promptly() -> None:
    sink = SinkServer().start()
    first, second = RawSMTP(sink.address), RawSMTP(sink.address)
    try:
        first.greeting()
        second.greeting()
        assert sink.max_concurrent == 2
        started = time.monotonic()
        sink.stop()
        assert time.monotonic() - started < 2
        assert first.closed() and second.closed()
        with pytest.raises(OSError):
            socket.create_connection(sink.address, timeout=2)
    finally:
        first.close()
        second.close()
