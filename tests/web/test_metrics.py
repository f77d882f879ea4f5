"""GET /metrics: Prometheus text for an admin key, or on its own listener without one."""

from __future__ import annotations

import re
import smtplib
import urllib.request
from collections.abc import Callable

from tests.harness import Mailsuite, free_port
from tests.web.client import ApiClient


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name:
            got = ",".join(sorted((match.group(2) or "").split(",")))
            if got == wanted:
                return float(match.group(3))
    raise AssertionError(f"no sample {name}{{{wanted}}}")


def test_metrics_need_an_admin_key_and_count_requests_and_the_queue(
        api: ApiClient, mailsuite: Mailsuite) -> None:
    reader = api.with_key(api.post("/v1/api-keys", {"name": "r",
                                                    "scopes": ["keys:write"]}).json["key"])
    assert reader.get("/metrics").status == 403
    assert api.with_key(None).get("/metrics").status == 401
    before = api.get("/metrics")
    assert before.status == 200
    assert before.headers["Content-Type"].startswith("text/plain; version=")
    count = sample(before.body.decode(), "mailsuite_http_requests_total",
                   route="/v1/me", method="GET", status="200") if \
        'route="/v1/me"' in before.body.decode() else 0.0
    for _ in range(3):
        api.get("/v1/me")
    api.get("/v1/nowhere", check=False)
    text = api.get("/metrics").body.decode()
    assert sample(text, "mailsuite_http_requests_total", route="/v1/me", method="GET",
                  status="200") == count + 3
    assert sample(text, "mailsuite_http_requests_total", route="unmatched", method="-",
                  status="404") >= 1
    assert sample(text, "mailsuite_http_request_seconds_count", route="/v1/me",
                  method="GET") >= 3
    assert sample(text, "mailsuite_queue_recipients", state="queued") >= 0
    assert "/v1/nowhere" not in text  # raw paths never become labels


def test_connections_and_messages_are_counted(api: ApiClient, mailsuite: Mailsuite) -> None:
    def received() -> float:
        text = api.get("/metrics").body.decode()
        return sample(text, "mailsuite_messages_total", direction="received") \
            if 'direction="received"' in text else 0.0

    before = received()
    address = mailsuite.new_account()
    with smtplib.SMTP(*mailsuite.mx, timeout=30) as smtp:
        smtp.sendmail("someone@spf-pass.test", [address], b"Subject: m\r\n\r\nx\r\n")
        # The metrics request itself holds an HTTP connection, and this one is open.
        text = api.get("/metrics").body.decode()
        assert sample(text, "mailsuite_connections", listener="mx") >= 1
        assert sample(text, "mailsuite_connections", listener="http") >= 1
    assert received() == before + 1


def test_a_metrics_listener_serves_them_without_a_key(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    port = free_port()
    server = start_mailsuite({"listen": {"metrics": f"tcp:{port}:interface=127.0.0.1"}})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    assert sample(text, "mailsuite_queue_recipients", state="deferred") == 0
    assert "process_cpu_seconds_total" in text
    assert server.log().count("Traceback") == 0
