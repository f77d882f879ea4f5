"""Aliases over HTTP: the CLI's rules, mail delivered through them, the tenant boundary."""

from __future__ import annotations

import smtplib

from tests.harness import Mailsuite
from tests.web.client import ApiClient


def test_an_alias_made_by_the_api_delivers_and_keeps_its_id(api: ApiClient,
                                                            mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    alice, bob = mailsuite.new_account(domain), mailsuite.new_account(domain)
    made = api.post("/v1/aliases", {"source": f"Team@{domain}", "destinations": [alice]})
    assert made.status == 201, made.body
    alias = made.json
    assert alias["id"].startswith("ali_") and alias["source"] == f"team@{domain}"
    grown = api.post("/v1/aliases", {"source": f"team@{domain}", "destinations": [bob]}).json
    assert grown == {"id": alias["id"], "source": f"team@{domain}",
                     "destinations": sorted([alice, bob])}
    again = api.post("/v1/aliases", {"source": f"team@{domain}", "destinations": [bob]})
    assert again.status == 409

    with smtplib.SMTP(*mailsuite.mx, timeout=30) as smtp:
        smtp.sendmail("someone@spf-pass.test", [f"team@{domain}"], b"Subject: t\r\n\r\nhi\r\n")
    assert len(mailsuite.inbox(alice)) == 1 and len(mailsuite.inbox(bob)) == 1

    listed = api.get("/v1/aliases?limit=100").json["data"]
    assert grown in listed
    assert api.delete(f"/v1/aliases/{alias['id']}").status == 204
    assert api.delete(f"/v1/aliases/{alias['id']}").status == 404
    assert mailsuite.store.alias_find(f"team@{domain}") is None


def test_alias_rules_and_reach(api: ApiClient, mailsuite: Mailsuite) -> None:
    mine, theirs = mailsuite.new_domain(), mailsuite.new_domain()
    account = mailsuite.new_account(mine)
    for body, status in (({"source": account, "destinations": ["x@y.test"]}, 409),
                         ({"source": "a@not-ours.test", "destinations": [account]}, 404),
                         ({"source": f"bad address@{mine}", "destinations": [account]}, 400),
                         ({"source": f"a@{mine}", "destinations": []}, 400),
                         ({"source": f"a@{mine}", "destinations": ["not an address"]}, 400)):
        reply = api.post("/v1/aliases", body)
        assert reply.status == status, (body, reply.body)
    catch_all = api.post("/v1/aliases", {"source": f"@{mine}", "destinations": [account]})
    assert catch_all.status == 201
    foreign = api.post("/v1/aliases", {"source": f"x@{theirs}", "destinations": ["a@b.test"]})
    tenant = api.with_key(api.post("/v1/api-keys", {
        "name": "t", "scopes": ["domains:write"], "domains": [mine]}).json["key"])
    seen = [a["id"] for a in tenant.get("/v1/aliases?limit=100").json["data"]]
    assert seen == [catch_all.json["id"]]
    assert tenant.delete(f"/v1/aliases/{foreign.json['id']}").status == 404
    assert tenant.post("/v1/aliases", {"source": f"y@{theirs}",
                                       "destinations": ["a@b.test"]}).status == 404
    assert mailsuite.store.alias_find(f"x@{theirs}") is not None
