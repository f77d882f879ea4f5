"""Delivery to the MX with swaks, an SMTP client we did not write."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.harness import Mailsuite

SWAKS = "/usr/bin/swaks"


def swaks(server: Mailsuite, to: str, *extra: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("swaks") or shutil.which(SWAKS)
    if path is None:
        pytest.fail("swaks is not installed; scripts/test installs it (Debian package swaks)")
    host, port = server.mx
    command = [path, "--server", host, "--port", str(port), "--to", to,
               "--from", "sender@spf-pass.test", "--ehlo", "client.test", "--timeout", "20",
               *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"swaks exited {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_swaks_plain_delivery_is_stored_with_its_body(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    result = swaks(mailsuite, rcpt, "--header", "Subject: hello from swaks",
                   "--body", "plain swaks body line")
    assert result.returncode == 0, explain(result)
    [stored] = mailsuite.inbox(rcpt)
    assert b"Subject: hello from swaks\r\n" in stored
    assert b"\r\n\r\nplain swaks body line\r\n" in stored
    assert b" with ESMTP id " in stored


def test_swaks_delivery_over_starttls_is_stored_and_received_says_esmtps(
        mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    result = swaks(mailsuite, rcpt, "-tls", "--header", "Subject: over tls",
                   "--body", "encrypted swaks body")
    if "Net::SSLeay" in result.stdout + result.stderr:
        pytest.fail("swaks cannot do TLS without Net::SSLeay (Debian package "
                    "libnet-ssleay-perl, which scripts/test must install)\n" + explain(result))
    assert result.returncode == 0, explain(result)
    assert "220 2.0.0 Ready to start TLS" in result.stdout, explain(result)
    [stored] = mailsuite.inbox(rcpt)
    received = stored.split(b"\r\nAuthentication-Results:", 1)[0]
    assert b"Received: from client.test ([127.0.0.1])" in received
    assert b" with ESMTPS id " in received
    assert b"\r\n\r\nencrypted swaks body\r\n" in stored


def test_swaks_to_an_unknown_user_fails_with_550_5_1_1(mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    result = swaks(mailsuite, f"nobody@{domain}", "--body", "nobody reads this")
    assert result.returncode != 0, explain(result)
    assert "550 5.1.1" in result.stdout, explain(result)
