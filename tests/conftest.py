"""Fixtures that start real things: PostgreSQL databases, a loopback DNS server, mailsuite."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.dnsserver import DNSServerHandle, start_dns_server
from tests.harness import Mailsuite

PG_ADMIN_URL = os.environ.get("MAILSUITE_TEST_PG_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")
DKIM_SELECTOR = "sel"


def _pg_connect(url: str):  # type: ignore[no-untyped-def]
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def pg_available() -> bool:
    try:
        _pg_connect(PG_ADMIN_URL).close()
        return True
    except Exception as exc:
        if os.environ.get("MAILSUITE_TEST_REQUIRE_PG") == "1":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required and unreachable: {exc}")
        return False


@pytest.fixture(scope="session")
def new_db_url(tmp_path_factory: pytest.TempPathFactory,
               pg_available: bool) -> Iterator[Callable[[str], str]]:
    """new_db_url(backend): the URL of a brand-new, empty database."""
    created: list[str] = []

    def make(backend: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'mailsuite.db'}"
        if not pg_available:
            pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_URL} (CI requires it)")
        name = f"mailsuite_test_{secrets.token_hex(5)}"
        conn = _pg_connect(PG_ADMIN_URL)
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
        conn.close()
        created.append(name)
        base, _, _ = PG_ADMIN_URL.rpartition("/")
        return f"{base}/{name}"

    yield make
    if created:
        conn = _pg_connect(PG_ADMIN_URL)
        for name in created:
            conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def dkim_key() -> tuple[bytes, str]:
    """(private key PEM, the p= value of its DNS record)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    return pem, base64.b64encode(public).decode("ascii")


def sender_zones(dkim_public: str) -> dict[str, Any]:
    """Sender domains for SPF/DKIM/DMARC cases; mail from the tests comes from 127.0.0.1."""
    def txt(value: str) -> dict[str, str]:
        return {"type": "TXT", "value": value}

    dkim_record = txt(f"v=DKIM1; k=rsa; p={dkim_public}")
    return {
        "records": {
            "spf-pass.test": [txt("v=spf1 ip4:127.0.0.1 -all")],
            "_dmarc.spf-pass.test": [txt("v=DMARC1; p=reject")],
            "spf-fail.test": [txt("v=spf1 ip4:192.0.2.1 -all")],
            "_dmarc.spf-fail.test": [txt("v=DMARC1; p=reject")],
            "softfail.test": [txt("v=spf1 ~all")],
            "dkim.test": [txt("v=spf1 ip4:192.0.2.1 -all")],
            f"{DKIM_SELECTOR}._domainkey.dkim.test": [dkim_record],
            "_dmarc.dkim.test": [txt("v=DMARC1; p=quarantine")],
            "nodmarc.test": [txt("v=spf1 ip4:127.0.0.1 -all")],
            "bounces.spf-pass.test": [txt("v=spf1 ip4:127.0.0.1 -all")],
            # DKIM the only way to pass DMARC, whose policy asks for nothing (p=none).
            "monitor.test": [txt("v=spf1 ip4:192.0.2.1 -all")],
            f"{DKIM_SELECTOR}._domainkey.monitor.test": [dkim_record],
            "_dmarc.monitor.test": [txt("v=DMARC1; p=none")],
            # DMARC policy enforcement: SPF fails from 127.0.0.1 and nothing is signed.
            "reject-pct0.test": [txt("v=spf1 ip4:192.0.2.1 -all")],
            "_dmarc.reject-pct0.test": [txt("v=DMARC1; p=reject; pct=0")],
            "reject-pct100.test": [txt("v=spf1 ip4:192.0.2.1 -all")],
            "_dmarc.reject-pct100.test": [txt("v=DMARC1; p=reject; pct=100")],
            "quarantine-pct0.test": [txt("v=spf1 ip4:192.0.2.1 -all")],
            "_dmarc.quarantine-pct0.test": [txt("v=DMARC1; p=quarantine; pct=0")],
            "_dmarc.org-reject.test": [txt("v=DMARC1; p=reject; sp=quarantine")],
            # An ARC sealer (a mailing list) with the DKIM test key.
            f"{DKIM_SELECTOR}._domainkey.lists.test": [dkim_record],
        },
        "servfail": ["servfail.test"],
        "timeout": ["timeout.test"],
    }


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory: pytest.TempPathFactory,
               dkim_key: tuple[bytes, str]) -> Iterator[DNSServerHandle]:
    handle = start_dns_server(sender_zones(dkim_key[1]), tmp_path_factory.mktemp("dns"))
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailsuite]:
    """A mailsuite shared by the tests of one backend; tests make their own domains."""
    server = Mailsuite(tmp_path_factory.mktemp(f"mailsuite-{backend}"), new_db_url(backend),
                       dns_server.address).start()
    yield server
    server.stop()


@pytest.fixture
def start_mailsuite(backend: str, new_db_url: Callable[[str], str], dns_server: DNSServerHandle,
                    tmp_path: Path) -> Iterator[Callable[..., Mailsuite]]:
    """start_mailsuite(**overrides): a private mailsuite with its own config and database."""
    started: list[Mailsuite] = []

    def start(overrides: dict[str, dict[str, Any]] | None = None,
              db_url: str | None = None) -> Mailsuite:
        workdir = tmp_path / f"mailsuite-{len(started)}"
        server = Mailsuite(workdir, db_url or new_db_url(backend), dns_server.address, overrides)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
