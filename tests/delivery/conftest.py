"""Outbound delivery end to end: mailsuite delivers through its own DNS to real SMTP sinks.

One loopback DNS server serves the whole package; each module adds the zones it needs
(`delivery_dns.add(...)`; names are unique across modules). Sinks (tests/smtpsink.py) listen
on 127.0.0.2, 127.0.0.3, ... on one port per mailsuite, which is that mailsuite's
`[delivery] port`. The mailsuites here resolve through `delivery_dns`, not the session's DNS.
Modules that can share a mailsuite use `shared`; the others start their own with `servers`
(one test) or `module_servers` (one module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.delivery.support import (
    SHARED_REQUIRE_TLS,
    SHARED_SINK_HOSTS,
    DeliveryDNS,
    Servers,
    Shared,
    delivery_overrides,
)
from tests.dnsserver import start_dns_server
from tests.smtpsink import free_port_on, make_ca


@pytest.fixture(scope="package")
def delivery_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeliveryDNS]:
    handle = start_dns_server({"records": {}}, tmp_path_factory.mktemp("delivery-dns"))
    try:
        yield DeliveryDNS(handle)
    finally:
        handle.stop()


@pytest.fixture(scope="package")
def shared(backend: str, new_db_url: Callable[[str], str], delivery_dns: DeliveryDNS,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One mailsuite per backend for the modules whose tests can share it (each with its own
    sink addresses among SHARED_SINK_HOSTS); they start their sinks on `shared.port`."""
    servers = Servers(backend, new_db_url, delivery_dns,
                      tmp_path_factory.mktemp(f"delivery-shared-{backend}"))
    ca = make_ca(tmp_path_factory.mktemp("delivery-ca"))
    port = free_port_on(SHARED_SINK_HOSTS)
    server = servers.mailsuite(delivery_overrides(port, delivery={
        "require_tls": " ".join(SHARED_REQUIRE_TLS), "ca_file": str(ca[0])}))
    yield Shared(server, port, ca)
    servers.stop()


@pytest.fixture(scope="module")
def module_servers(backend: str, new_db_url: Callable[[str], str], delivery_dns: DeliveryDNS,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """For the sinks (and a mailsuite, if not the shared one) a module's tests share."""
    servers = Servers(backend, new_db_url, delivery_dns,
                      tmp_path_factory.mktemp(f"delivery-{backend}"))
    yield servers
    servers.stop()


@pytest.fixture
def servers(backend: str, new_db_url: Callable[[str], str], delivery_dns: DeliveryDNS,
            tmp_path: Path) -> Iterator[Servers]:
    """For a test's private mailsuites and sinks."""
    own = Servers(backend, new_db_url, delivery_dns, tmp_path)
    yield own
    own.stop()
