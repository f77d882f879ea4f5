"""POST /v1/domains/{id}/verify looks every record up through the configured resolver (here
a loopback twisted.names server whose zone the test rewrites)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DNSServerHandle, start_dns_server
from tests.harness import TEST_HOSTNAME, Mailsuite
from tests.web.client import ApiClient

DOMAIN = "verify-me.test"


@pytest.fixture
def zone_server(tmp_path: Path) -> Iterator[DNSServerHandle]:
    handle = start_dns_server({"records": {}}, tmp_path / "dns")
    yield handle
    handle.stop()


def published(records: list[dict], **changes: object) -> dict:
    """The zone with our records as published (TXT values as one string each)."""
    zone: dict[str, list] = {}
    for record in records:
        zone.setdefault(record["name"].rstrip("."), []).append(
            {"type": record["type"], "value": record["value"]})
    zone.update(changes)  # type: ignore[arg-type]
    return {"records": zone, "servfail": [], "timeout": []}


def by_type(result: dict) -> dict[str, dict]:
    out = {}
    for record in result["records"]:
        kind = ("dkim" if "_domainkey" in record["name"] else
                "dmarc" if record["name"].startswith("_dmarc") else record["type"].lower())
        if kind == "txt":
            kind = "spf"
        out[kind] = record
    return out


def test_a_domain_is_verified_once_mx_spf_and_dkim_match(
        start_mailsuite: Callable[..., Mailsuite], zone_server: DNSServerHandle) -> None:
    server = start_mailsuite({"dns": {"resolver": zone_server.address, "timeout": 1.0}})
    _, secret = server.store.api_key_add("admin", ["admin"])
    api = ApiClient(server.http, secret)
    domain = api.post("/v1/domains", {"name": DOMAIN}).json
    records = domain["records"]

    nothing = api.post(f"/v1/domains/{domain['id']}/verify").json
    assert nothing["domain"]["status"] == "pending"
    assert {r["status"] for r in nothing["records"]} == {"missing"}

    zone_server.update(published(records))
    done = api.post(f"/v1/domains/{domain['id']}/verify").json
    assert done["domain"]["status"] == "verified" and done["domain"]["verified_at"]
    assert {r["status"] for r in done["records"]} == {"verified"}
    assert api.get(f"/v1/domains/{DOMAIN}").json["status"] == "verified"

    # Someone points the MX elsewhere and edits SPF: a mismatch, with what was found.
    wrong = published(records, **{DOMAIN: [
        {"type": "MX", "value": "10 mail.elsewhere.test"},
        {"type": "TXT", "value": "v=spf1 include:elsewhere.test -all"}]})
    zone_server.update(wrong)
    result = by_type(api.post(f"/v1/domains/{domain['id']}/verify").json)
    assert result["mx"]["status"] == "mismatch"
    assert result["mx"]["found"] == ["10 mail.elsewhere.test."]
    assert result["mx"]["value"] == f"10 {TEST_HOSTNAME}."
    assert result["spf"]["status"] == "mismatch"
    assert result["spf"]["found"] == ["v=spf1 include:elsewhere.test -all"]
    assert result["dkim"]["status"] == "verified"
    assert api.get(f"/v1/domains/{DOMAIN}").json["status"] == "pending"


def test_a_dns_timeout_is_temperror_for_that_record_never_a_500(
        start_mailsuite: Callable[..., Mailsuite], zone_server: DNSServerHandle) -> None:
    server = start_mailsuite({"dns": {"resolver": zone_server.address, "timeout": 0.5}})
    _, secret = server.store.api_key_add("admin", ["admin"])
    api = ApiClient(server.http, secret)
    domain = api.post("/v1/domains", {"name": DOMAIN}).json
    zone = published(domain["records"])
    zone["timeout"] = [DOMAIN]  # the domain's own name (MX, SPF) never answers
    zone_server.update(zone)
    reply = api.post(f"/v1/domains/{domain['id']}/verify")
    assert reply.status == 200
    result = by_type(reply.json)
    assert result["mx"]["status"] == "temperror" and result["spf"]["status"] == "temperror"
    assert reply.json["domain"]["status"] == "pending"
