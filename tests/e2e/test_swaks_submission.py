"""Submission with swaks, an SMTP client we did not write: STARTTLS on the submission port,
implicit TLS on submissions (RFC 8314), AUTH PLAIN and LOGIN (RFC 4954)."""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess

import pytest

from tests.harness import Mailsuite

SWAKS = "/usr/bin/swaks"
PASSWORD = "correct horse"
# listener → how swaks gets TLS on it
TLS_FLAG = {"submission": "--tls", "submissions": "--tls-on-connect"}


def swaks(server: Mailsuite, listener: str, user: str, to: str, *extra: str,
          password: str = PASSWORD, mechanism: str = "PLAIN",
          sender: str | None = None) -> subprocess.CompletedProcess[str]:
    path = shutil.which("swaks") or shutil.which(SWAKS)
    if path is None:
        pytest.fail("swaks is not installed; scripts/test installs it (Debian package swaks)")
    host, port = getattr(server, listener)
    command = [path, "--server", host, "--port", str(port), TLS_FLAG[listener],
               "--auth", mechanism, "--auth-user", user, "--auth-password", password,
               "--to", to, "--from", sender or user, "--ehlo", "client.test",
               "--timeout", "10", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if "Net::SSLeay" in result.stdout + result.stderr:
        pytest.fail("swaks cannot do TLS without Net::SSLeay (Debian package "
                    "libnet-ssleay-perl, which scripts/test must install)\n" + explain(result))
    return result


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"swaks exited {result.returncode}\n{result.stdout}\n{result.stderr}"


def forget_failures(server: Mailsuite) -> None:
    """A successful login clears the failure count the server keeps for 127.0.0.1."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(*server.submission, local_hostname="client.test", timeout=10) as client:
        client.starttls(context=context)
        client.login(server.new_account(), PASSWORD)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_swaks_authenticated_submission_is_stored_in_the_local_inbox(
        mailsuite: Mailsuite, listener: str, mechanism: str) -> None:
    domain = mailsuite.new_domain()
    sender, rcpt = mailsuite.new_account(domain), mailsuite.new_account(domain)
    body = f"swaks {mechanism} over {listener}"
    result = swaks(mailsuite, listener, sender, rcpt, "--header", "Subject: submitted",
                   "--body", body, mechanism=mechanism)
    assert result.returncode == 0, explain(result)
    assert "235 2.7.0 Authentication successful" in result.stdout, explain(result)
    if listener == "submission":
        assert "220 2.0.0 Ready to start TLS" in result.stdout, explain(result)
    [stored] = mailsuite.inbox(rcpt)
    assert stored.startswith(f"Return-Path: <{sender}>\r\n".encode())
    assert b" with ESMTPSA id " in stored.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nSubject: submitted\r\n" in stored
    assert f"\r\n\r\n{body}\r\n".encode() in stored


@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_swaks_with_a_wrong_password_fails_535_and_nothing_is_stored(
        mailsuite: Mailsuite, listener: str) -> None:
    address = mailsuite.new_account()
    try:
        result = swaks(mailsuite, listener, address, address, "--body", "never sent",
                       password="wrong horse")
    finally:
        forget_failures(mailsuite)  # leave no penalty behind for the next tests
    assert result.returncode != 0, explain(result)
    assert "535 5.7.8" in result.stdout, explain(result)
    assert mailsuite.inbox(address) == []


@pytest.mark.parametrize("forged", ["envelope", "header"])
def test_swaks_sending_as_someone_else_is_refused_553_and_nothing_is_stored(
        mailsuite: Mailsuite, forged: str) -> None:
    domain = mailsuite.new_domain()
    address, other = mailsuite.new_account(domain), mailsuite.new_account(domain)
    if forged == "envelope":
        result = swaks(mailsuite, "submission", address, address, "--body", "forged",
                       sender=other)
    else:
        result = swaks(mailsuite, "submission", address, address, "--body", "forged",
                       "--header", f"From: {other}")
    assert result.returncode != 0, explain(result)
    assert "553 5.7.1" in result.stdout, explain(result)
    assert mailsuite.inbox(address) == []
