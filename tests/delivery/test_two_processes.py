"""Two mailsuite processes on one PostgreSQL database share the outbound queue: claims with
FOR UPDATE SKIP LOCKED mean each message goes out exactly once, and both do the work."""

from __future__ import annotations

import re
import threading
from collections import Counter

import pytest

from tests.delivery.support import (
    Servers,
    delivery_overrides,
    message_id_of,
    routed,
    submit_many,
    wait_until,
)
from tests.harness import Mailsuite
from tests.smtpsink import free_port_on

SINK = "127.0.0.23"
DOMAIN = "shared-queue.test"
COUNT = 200
DELIVERED = re.compile(r"delivery \S+ to=<[^>]+> relay=\S+ status=delivered")


def delivered_lines(server: Mailsuite) -> int:
    return len(DELIVERED.findall(server.log()))


def test_two_processes_deliver_a_shared_queue_each_message_exactly_once(
        backend: str, servers: Servers) -> None:
    if backend == "sqlite":
        pytest.skip("several processes share PostgreSQL only")
    servers.dns.add(routed(DOMAIN, SINK))
    port = free_port_on([SINK])
    sink = servers.sink(SINK, port, start=False)  # the queue builds up first
    overrides = delivery_overrides(port, delivery={"claim_batch": 20})
    first = servers.mailsuite(overrides)
    second = servers.mailsuite(overrides, db_url=first.db_url)
    sender = first.new_account()
    recipients = [f"r{n}@{DOMAIN}" for n in range(COUNT)]

    # Half the queue comes in through each process, at the same time.
    message_ids: list[str] = []
    errors: list[BaseException] = []

    def submit_half(server: Mailsuite, half: list[str], name: str) -> None:
        try:
            message_ids.extend(submit_many(server, sender, half, name, len(half)))
        except BaseException as exc:  # reported by the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=submit_half, args=(server, half, name))
               for server, half, name in ((first, recipients[0::2], "first"),
                                          (second, recipients[1::2], "second"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(message_ids) == COUNT
    assert first.store.queue_size() == COUNT

    sink.start()
    wait_until(lambda: first.store.queue_size() == 0, "an empty queue", timeout=60)
    wait_until(lambda: delivered_lines(first) + delivered_lines(second) >= COUNT,
               "every delivery in the logs")
    counts = Counter(message_id_of(m) for m in sink.messages)
    assert counts == Counter(message_ids)  # each one exactly once
    assert sorted(r for m in sink.messages for r in m.rcpts) == sorted(recipients)
    by_first, by_second = delivered_lines(first), delivered_lines(second)
    assert by_first + by_second == COUNT
    assert by_first > 0 and by_second > 0, (by_first, by_second)
