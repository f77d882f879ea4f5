"""The HTTP listener against slow clients: a request must arrive in time (408, then close),
while a slow but steady upload is not cut off."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.harness import Mailsuite
from tests.web.client import ApiClient

TIMEOUT = 2.0


@pytest.fixture
def server(start_mailsuite: Callable[..., Mailsuite]) -> Mailsuite:
    return start_mailsuite({"api": {"request_timeout": TIMEOUT, "min_data_rate": 1000}})


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_dripped_request_gets_408_at_the_deadline(server: Mailsuite) -> None:
    sock = socket.create_connection(server.http, timeout=15)
    started = time.monotonic()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 200
    sent = 0
    try:
        for octet in request:  # one octet every 0.3 s: the idle timer alone never fires
            sock.sendall(bytes([octet]))
            sent += 1
            time.sleep(0.3)
    except (BrokenPipeError, ConnectionResetError):
        pass
    elapsed = time.monotonic() - started
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code": "request_timeout"' in answer
    assert sent < len(request)
    assert TIMEOUT - 0.2 <= elapsed < TIMEOUT + 2.0, elapsed
    sock.close()
    assert "Traceback" not in server.log()


def test_a_slow_steady_upload_earns_its_time(server: Mailsuite) -> None:
    _, secret = server.store.api_key_add("admin", ["admin"])
    # JSON allows trailing white space: 6,000 octets that take 4 s at 1,500 octets a second,
    # twice request_timeout, but each octet buys 1 ms (min_data_rate 1000).
    body = b'{"name": "slow", "scopes": ["keys:read"]}' + b" " * 6000
    sock = socket.create_connection(server.http, timeout=15)
    sock.sendall(b"POST /v1/api-keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nAuthorization: Bearer " + secret.encode() + b"\r\nConnection: close"
                 b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    started = time.monotonic()
    for offset in range(0, len(body), 300):
        sock.sendall(body[offset:offset + 300])
        time.sleep(0.2)
    answer = read_all(sock)
    elapsed = time.monotonic() - started
    assert elapsed > TIMEOUT + 1.0, elapsed
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]
    sock.close()
    assert ApiClient(server.http).get("/healthz").status == 200
