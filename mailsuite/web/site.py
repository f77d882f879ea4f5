"""The HTTP listener: a twisted.web Site serving the API, with a cap on request bodies."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.web import http, server

from mailsuite import __version__, metrics
from mailsuite.config import Config
from mailsuite.sending import SigningKeys
from mailsuite.store import AsyncStore
from mailsuite.web import aliases, domains, inboxes, keys, messages
from mailsuite.web.api import Api, ApiError, Call, Raw, Services, new_request_id
from mailsuite.web.models import Health
from mailsuite.web.ratelimit import RateLimiter


def build_api() -> Api:
    api = Api(title="mailsuite", version=__version__)

    @api.operation("GET", "/healthz", scope=None, response=Health, tag="meta",
                   summary="Whether the store answers", errors={503: "the store does not answer"})
    async def healthz(call: Call) -> Health:
        try:
            await call.store.ping()
        except Exception:
            raise ApiError(503, "unavailable", "the store does not answer") from None
        return Health(status="ok")

    @api.operation("GET", "/v1/openapi.json", scope=None, summary="This document (OpenAPI 3.1)",
                   tag="meta")
    async def openapi(call: Call) -> dict[str, Any]:
        return document

    @api.operation("GET", "/metrics", scope="admin", tag="meta", media=metrics.CONTENT_TYPE,
                   summary="Prometheus metrics of this process (text exposition format)")
    async def get_metrics(call: Call) -> Raw:
        return await _metrics(call.store)

    keys.register(api)
    domains.register(api)
    inboxes.register(api)
    aliases.register(api)
    messages.register(api)
    document = api.openapi()
    return api


class LimitedRequest(server.Request):
    """Refuses a body over the limit with 413 as soon as it is announced or exceeded, and
    closes the connection, so an oversized upload is never buffered."""

    max_body = 35 * 1024 * 1024

    def gotLength(self, length: int | None) -> None:
        self._body_seen = 0
        if length is not None and length > self.max_body:
            self._refuse_too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        if self._body_seen > self.max_body:
            self._refuse_too_large()
            return
        super().handleContentChunk(data)

    def _refuse_too_large(self) -> None:
        if getattr(self, "_refused", False):
            return
        self._refused = True
        answer_and_close(self.channel.transport, 413, "Payload Too Large", "payload_too_large",
                         f"the body is over {self.max_body} bytes")


async def _metrics(store: AsyncStore) -> Raw:
    return Raw(metrics.render(await store.queue_depth()), metrics.CONTENT_TYPE)


def answer_and_close(transport: Any, status: int, reason: str, code: str, message: str) -> None:
    """A JSON error written straight to the connection, which then closes: for refusals made
    before a request exists to answer through."""
    rid = new_request_id()
    body = json.dumps({"error": {"code": code, "message": message, "request_id": rid}})
    transport.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: {rid}\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    transport.loseConnection()


class DeadlineChannel(http.HTTPChannel):
    """HTTP/1.1 whose requests must arrive in time: from a request's first octet, its line,
    headers and body get request_timeout seconds plus one per min_data_rate octets received.
    The idle timer alone lets a client that drips a request hold the connection forever.
    (HTTP/1.1 only: the API needs no HTTP/2, and this keeps the channel ours.)"""

    request_timeout = 30.0
    min_data_rate = 500

    def __init__(self) -> None:
        super().__init__()
        self._request_started: float | None = None
        self._request_octets = 0
        self._request_timer: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self._request_started is None:
            self._request_started = self.site.reactor.seconds()
            self._request_octets = 0
            self._request_timer = self.callLater(self.request_timeout, self._request_overdue)
        self._request_octets += len(data)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._request_done()
        super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        self._request_done()
        super().connectionLost(reason)

    def _request_done(self) -> None:
        self._request_started = None
        if self._request_timer is not None and self._request_timer.active():
            self._request_timer.cancel()
        self._request_timer = None

    def _request_overdue(self) -> None:
        assert self._request_started is not None
        allowed = self.request_timeout + self._request_octets / self.min_data_rate
        remaining = self._request_started + allowed - self.site.reactor.seconds()
        if remaining > 0:  # the client kept sending: it has earned more time
            self._request_timer = self.callLater(remaining, self._request_overdue)
            return
        self._request_timer = None
        answer_and_close(self.transport, 408, "Request Timeout", "request_timeout",
                         "the request took too long to arrive")


def make_metrics_site(store: AsyncStore) -> server.Site:
    """[listen] metrics: /metrics alone, without a key, for a scraper on a private address."""
    app = Klein()

    @app.route("/metrics", methods=["GET"])
    async def get_metrics(request: Any) -> bytes:
        result = await _metrics(store)
        request.setHeader("Content-Type", result.content_type)
        return result.body

    site = server.Site(app.resource(), timeout=60)
    site.protocol = DeadlineChannel
    site.displayTracebacks = False
    return site


def make_site(store: AsyncStore, config: Config, resolver: Any,
              queued: Callable[[], None]) -> server.Site:
    limiter = RateLimiter(config.api.rate_limit) if config.api.rate_limit else None
    app = build_api().klein(Services(store, config, resolver, limiter,
                                     SigningKeys(store.store), queued))
    request_class = type("Request", (LimitedRequest,), {"max_body": config.api.max_body})
    # twisted.web keeps an idle connection 12 hours by default; a minute is plenty for an API.
    site = server.Site(app.resource(), requestFactory=request_class, timeout=60)
    site.protocol = type("Channel", (DeadlineChannel,), {
        "request_timeout": config.api.request_timeout,
        "min_data_rate": config.api.min_data_rate})
    site.displayTracebacks = False
    site.noisy = False
    return site
