"""This process's Prometheus metrics, for GET /metrics. Protocol-neutral: listeners count
their connections and committed messages here; the queue's depth is read from the store at
each scrape."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

HTTP_REQUESTS = Counter("mailsuite_http_requests_total", "HTTP API requests answered",
                        ["route", "method", "status"])
HTTP_SECONDS = Histogram("mailsuite_http_request_seconds", "HTTP API time to answer",
                         ["route", "method"],
                         buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
CONNECTIONS = Gauge("mailsuite_connections", "Open connections, by listener", ["listener"])
MESSAGES = Counter("mailsuite_messages_total", "Messages committed: received by the MX, sent "
                   "through submission (or the API)", ["direction"])
QUEUE = Gauge("mailsuite_queue_recipients", "Recipients waiting in the outbound queue "
              "(shared by every process on the database)", ["state"])


def render(queue_depth: dict[str, int]) -> bytes:
    for state in ("queued", "deferred"):
        QUEUE.labels(state).set(queue_depth.get(state, 0))
    return generate_latest(REGISTRY)
