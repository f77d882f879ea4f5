"""Where outbound mail goes (RFC 5321 5.1, RFC 7505): MX preference and fallback, the implicit
MX, null MX, NXDOMAIN, one transaction per destination domain, and mail loops (5.4.6)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.delivery.support import (
    Servers,
    Shared,
    a,
    dsn_blocks,
    events_for,
    message,
    message_id_of,
    mx,
    routed,
    submit,
    token,
    wait_dsn,
    wait_event,
    wait_received,
    wait_until,
)
from tests.harness import TEST_HOSTNAME, Mailsuite
from tests.smtpsink import SinkServer

MAIN, BACKUP, NOTHING, LOOPER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"

ZONES = {
    # Preference 10 is an address where nothing listens; 20 is the sink.
    "fallback.routing.test": [mx(10, "mx1.fallback.routing.test"),
                              mx(20, "mx2.fallback.routing.test")],
    "mx1.fallback.routing.test": [a(NOTHING)],
    "mx2.fallback.routing.test": [a(BACKUP)],
    "implicit.routing.test": [a(MAIN)],  # no MX at all: the domain is its own MX
    "nullmx.routing.test": [mx(0, ".")],  # RFC 7505: accepts no mail
    **routed("one.routing.test", MAIN),
    **routed("two.routing.test", MAIN),
    "loop.routing.test": [mx(10, TEST_HOSTNAME)],  # the MX is us
    **routed("mirror.routing.test", LOOPER),  # a server that calls itself by our name
}
# nxdomain.routing.test is in no zone: NXDOMAIN.


@dataclass
class Routing:
    server: Mailsuite
    main: SinkServer
    backup: SinkServer
    looper: SinkServer

    @property
    def sinks(self) -> list[SinkServer]:
        return [self.main, self.backup, self.looper]

    def contacted_about(self, recipient: str) -> list[str]:
        return [f"{s.host}: {rcpt}" for s in self.sinks for rcpt, _ in s.rcpt_log
                if rcpt == recipient]


@pytest.fixture(scope="module")
def routing(shared: Shared, module_servers: Servers) -> Routing:
    module_servers.dns.add(ZONES)
    port = shared.port
    main = module_servers.sink(MAIN, port, hostname="main.routing.test")
    backup = module_servers.sink(BACKUP, port, hostname="backup.routing.test")
    looper = module_servers.sink(LOOPER, port, hostname=TEST_HOSTNAME)
    return Routing(shared.server, main, backup, looper)


def queued_recipients(server: Mailsuite) -> list[str]:
    return [rcpt[0] for entry in server.store.queue_list() for rcpt in entry.recipients]


def send_one(routing: Routing, recipients: list[str]) -> tuple[str, str]:
    """(the local sender, the Message-ID) of a message submitted to `recipients`."""
    sender = routing.server.new_account()
    raw, message_id = message(sender, recipients, "routing")
    assert submit(routing.server, sender, recipients, raw) == {}
    return sender, message_id


def test_primary_mx_refusing_connections_falls_back_to_the_backup_mx(routing: Routing) -> None:
    rcpt = f"r{token()}@fallback.routing.test"
    _, message_id = send_one(routing, [rcpt])
    received = wait_received(routing.backup, rcpt)
    assert message_id_of(received) == message_id
    delivered = wait_event(routing.server, "delivered", rcpt)
    assert delivered.detail["remote"] == "mx2.fallback.routing.test"
    assert delivered.detail["attempt"] == 1  # the fallback is within the same attempt
    assert not events_for(routing.server, "deferred", rcpt)
    assert routing.contacted_about(rcpt) == [f"{BACKUP}: {rcpt}"]


def test_domain_without_mx_is_delivered_to_its_address_record_as_implicit_mx(
        routing: Routing) -> None:
    rcpt = f"r{token()}@implicit.routing.test"
    _, message_id = send_one(routing, [rcpt])
    assert message_id_of(wait_received(routing.main, rcpt)) == message_id
    assert wait_event(routing.server, "delivered", rcpt).detail["remote"] == \
        "implicit.routing.test"


def test_null_mx_domain_is_bounced_at_once_with_5_1_10_and_no_server_contacted(
        routing: Routing) -> None:
    rcpt = f"r{token()}@nullmx.routing.test"
    sender, message_id = send_one(routing, [rcpt])
    raw, block = wait_dsn(routing.server, sender, rcpt)
    assert block["action"] == "failed"
    assert block["status"] == "5.1.10"
    assert "null MX" in block["diagnostic-code"]
    assert message_id in raw.decode()  # the returned header section
    bounced = wait_event(routing.server, "bounced", rcpt)
    assert bounced.detail["attempt"] == 1
    assert not events_for(routing.server, "deferred", rcpt)
    assert routing.contacted_about(rcpt) == []
    assert rcpt not in queued_recipients(routing.server)


def test_nxdomain_recipient_domain_is_bounced_with_5_1_2(routing: Routing) -> None:
    rcpt = f"r{token()}@nxdomain.routing.test"
    sender, _ = send_one(routing, [rcpt])
    _, block = wait_dsn(routing.server, sender, rcpt)
    assert (block["action"], block["status"]) == ("failed", "5.1.2")
    assert "does not exist" in block["diagnostic-code"]
    assert wait_event(routing.server, "bounced", rcpt).detail["attempt"] == 1
    assert not events_for(routing.server, "deferred", rcpt)


def test_recipients_of_one_domain_share_one_transaction_and_each_domain_gets_its_own(
        routing: Routing) -> None:
    tag = token()
    one = [f"a{tag}@one.routing.test", f"b{tag}@one.routing.test", f"c{tag}@one.routing.test"]
    two = [f"d{tag}@two.routing.test"]
    _, message_id = send_one(routing, [*one, *two])
    for rcpt in [*one, *two]:
        wait_event(routing.server, "delivered", rcpt)
    transactions = [m for m in list(routing.main.messages) if message_id_of(m) == message_id]
    assert sorted(sorted(m.rcpts) for m in transactions) == [sorted(one), two]
    # RFC 5321 3.3: one MAIL, several RCPT, one DATA; each copy carries our one Received.
    for received in transactions:
        assert len(received.message.get_all("Received")) == 1


def test_mx_naming_our_own_host_is_a_loop_bounced_with_5_4_6(routing: Routing) -> None:
    rcpt = f"r{token()}@loop.routing.test"
    sender, _ = send_one(routing, [rcpt])
    raw, block = wait_dsn(routing.server, sender, rcpt)
    assert (block["action"], block["status"]) == ("failed", "5.4.6")
    assert dsn_blocks(raw)[0]["reporting-mta"] == f"dns; {TEST_HOSTNAME}"
    assert not events_for(routing.server, "deferred", rcpt)
    assert routing.contacted_about(rcpt) == []


def test_server_greeting_us_with_our_own_host_name_is_a_loop_bounced_with_5_4_6(
        routing: Routing) -> None:
    rcpt = f"r{token()}@mirror.routing.test"
    connections_before = routing.looper.connections
    sender, _ = send_one(routing, [rcpt])
    _, block = wait_dsn(routing.server, sender, rcpt)
    assert (block["action"], block["status"]) == ("failed", "5.4.6")
    assert "loops back to myself" in block["diagnostic-code"]
    assert not events_for(routing.server, "deferred", rcpt)
    # We hung up after the greeting (or EHLO): no transaction was started.
    wait_until(lambda: routing.looper.connections > connections_before, "the connection")
    assert routing.contacted_about(rcpt) == []
    assert not [c for c in routing.looper.commands if c.upper().startswith("MAIL")]
