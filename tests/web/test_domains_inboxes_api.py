"""Domains and inboxes over HTTP: the same store as the CLI, IMAP and SMTP. An inbox made by
the API is at once an IMAP account; every response is held to the OpenAPI document."""

from __future__ import annotations

import imaplib
import secrets
import smtplib
import ssl

from mailsuite import dkim
from tests.harness import Mailsuite
from tests.web.client import ApiClient


def new_name() -> str:
    return f"api{secrets.token_hex(4)}.test"


def imap_login(server: Mailsuite, address: str, password: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4(*server.imap)
    client.starttls(ssl_context=ssl._create_unverified_context())
    client.login(address, password)
    return client


def test_a_domain_made_by_the_api_has_the_records_the_cli_prints(
        api: ApiClient, mailsuite: Mailsuite) -> None:
    name = new_name()
    reply = api.post("/v1/domains", {"name": name.upper()})
    assert reply.status == 201, reply.body
    domain = reply.json
    assert domain["id"].startswith("dom_") and domain["name"] == name
    assert domain["status"] == "pending" and domain["verified_at"] is None
    keys = [dkim.DKIMKey(k.domain, k.selector, k.algorithm, k.private_key)
            for k in mailsuite.store.dkim_keys(name)]
    assert len(keys) == 1
    expected = [{"name": owner, "type": rtype, "value": value}
                for owner, rtype, value in dkim.dns_records(name, "mx.mailsuite.test", keys)]
    assert domain["records"] == expected
    assert [r["type"] for r in expected] == ["MX", "TXT", "TXT", "TXT"]
    assert api.get(f"/v1/domains/{domain['id']}/records").json["data"] == expected
    assert api.get(f"/v1/domains/{name}").json == domain
    assert mailsuite.store.is_local_domain(name)

    again = api.post("/v1/domains", {"name": name})
    assert again.status == 409 and again.error_code == "conflict"
    bad = api.post("/v1/domains", {"name": "not a domain"})
    assert bad.status == 400 and bad.json["error"]["param"] == "name"


def test_an_inbox_made_by_the_api_is_an_imap_and_smtp_account(
        api: ApiClient, mailsuite: Mailsuite) -> None:
    name = mailsuite.new_domain()
    reply = api.post("/v1/inboxes", {"local_part": "Agent", "domain": name,
                                     "display_name": "Support Agent",
                                     "password": "a long passphrase"})
    assert reply.status == 201, reply.body
    inbox = reply.json
    assert inbox["id"].startswith("inb_") and inbox["address"] == f"agent@{name}"

    with smtplib.SMTP(*mailsuite.mx, timeout=30) as smtp:
        smtp.sendmail("someone@spf-pass.test", [inbox["address"]],
                      b"Subject: for the agent\r\n\r\nhello\r\n")
    client = imap_login(mailsuite, inbox["address"], "a long passphrase")
    status, data = client.select("INBOX")
    assert status == "OK" and data == [b"1"]
    client.logout()

    detail = api.get(f"/v1/inboxes/{inbox['address']}").json
    assert detail["messages"] == 1 and detail["unread"] == 1 and detail["storage_used"] > 0
    assert [f["name"] for f in detail["folders"]] == ["INBOX", "Sent", "Drafts", "Trash",
                                                      "Junk", "Archive"]
    assert detail["folders"][1]["special_use"] == "\\Sent"

    changed = api.request("PATCH", f"/v1/inboxes/{inbox['id']}",
                          {"display_name": "Agent Smith", "password": "another passphrase"})
    assert changed.status == 200 and changed.json["display_name"] == "Agent Smith"
    imap_login(mailsuite, inbox["address"], "another passphrase").logout()

    folder = api.post(f"/v1/inboxes/{inbox['id']}/folders", {"name": "Projects/Übersicht"})
    assert folder.status == 201 and folder.json["messages"] == 0
    names = [f["name"] for f in api.get(f"/v1/inboxes/{inbox['id']}/folders").json["data"]]
    assert {"Projects", "Projects/Übersicht"} <= set(names)
    assert api.post(f"/v1/inboxes/{inbox['id']}/folders",
                    {"name": "Projects"}).status == 409

    assert api.delete(f"/v1/inboxes/{inbox['id']}").status == 204
    assert api.get(f"/v1/inboxes/{inbox['id']}").status == 404
    assert mailsuite.store.account_get(inbox["address"]) is None


def test_an_inbox_without_a_password_takes_no_password(api: ApiClient,
                                                       mailsuite: Mailsuite) -> None:
    name = mailsuite.new_domain()
    address = api.post("/v1/inboxes", {"address": f"keys-only@{name}"}).json["address"]
    for password in ("!", "", "x"):
        try:
            imap_login(mailsuite, address, password).logout()
        except imaplib.IMAP4.error:
            continue
        raise AssertionError(f"logged in with {password!r}")


def test_inbox_create_refuses_bad_addresses_and_foreign_domains(api: ApiClient,
                                                                mailsuite: Mailsuite) -> None:
    name = mailsuite.new_domain()
    for body, status, param in (
            ({"address": "no-at-sign"}, 400, "address"),
            ({"address": f"a b@{name}"}, 400, "address"),
            ({"local_part": "x"}, 400, None),
            ({"address": f"x@{name}", "local_part": "y", "domain": name}, 400, None),
            ({"address": "x@not-ours.test"}, 404, None),
            ({"address": f"x@{name}", "password": ""}, 400, "password"),
            ({"address": f"x@{name}", "unknown": 1}, 400, "unknown")):
        reply = api.post("/v1/inboxes", body)
        assert reply.status == status, (body, reply.body)
        if param is not None:
            assert reply.json["error"]["param"] == param, (body, reply.body)
    assert api.post("/v1/inboxes", {"address": f"twice@{name}"}).status == 201
    assert api.post("/v1/inboxes", {"address": f"TWICE@{name}"}).status == 409


def test_a_restricted_key_sees_only_its_domains_and_inboxes(api: ApiClient,
                                                            mailsuite: Mailsuite) -> None:
    mine, theirs = mailsuite.new_domain(), mailsuite.new_domain()
    own = mailsuite.new_account(mine)
    other = mailsuite.new_account(theirs)
    made = api.post("/v1/api-keys", {"name": "tenant", "scopes": ["domains:write",
                                                                  "inboxes:write"],
                                     "domains": [mine]}).json
    tenant = api.with_key(made["key"])
    assert [d["name"] for d in tenant.get("/v1/domains").json["data"]] == [mine]
    assert [i["address"] for i in tenant.get("/v1/inboxes?limit=100").json["data"]] == [own]
    theirs_id = api.get(f"/v1/domains/{theirs}").json["id"]
    other_id = api.get(f"/v1/inboxes/{other}").json["id"]
    for method, path, body in (
            ("GET", f"/v1/domains/{theirs}", None), ("GET", f"/v1/domains/{theirs_id}", None),
            ("GET", f"/v1/domains/{theirs_id}/records", None),
            ("DELETE", f"/v1/domains/{theirs_id}?force=true", None),
            ("GET", f"/v1/inboxes/{other}", None), ("GET", f"/v1/inboxes/{other_id}", None),
            ("PATCH", f"/v1/inboxes/{other_id}", {"display_name": "x"}),
            ("DELETE", f"/v1/inboxes/{other_id}", None),
            ("GET", f"/v1/inboxes/{other_id}/folders", None),
            ("POST", f"/v1/inboxes/{other_id}/folders", {"name": "x"}),
            ("POST", "/v1/inboxes", {"address": f"new@{theirs}"})):
        reply = tenant.request(method, path, body)
        assert reply.status == 404 and reply.error_code == "not_found", (method, path)
    assert tenant.post("/v1/domains", {"name": new_name()}).status == 403
    assert mailsuite.store.account_get(other) is not None
    assert tenant.post("/v1/inboxes", {"address": f"new@{mine}"}).status == 201


def test_deleting_a_domain_with_inboxes_needs_force(api: ApiClient,
                                                    mailsuite: Mailsuite) -> None:
    name = api.post("/v1/domains", {"name": new_name()}).json["name"]
    api.post("/v1/inboxes", {"address": f"a@{name}"})
    refused = api.delete(f"/v1/domains/{name}")
    assert refused.status == 409 and "force=true" in refused.json["error"]["message"]
    assert api.delete(f"/v1/domains/{name}?force=true").status == 204
    assert api.get(f"/v1/domains/{name}").status == 404
    assert not mailsuite.store.is_local_domain(name)


def test_domain_and_inbox_lists_page_by_keyset(api: ApiClient, mailsuite: Mailsuite) -> None:
    name = mailsuite.new_domain()
    made = [api.post("/v1/inboxes", {"address": f"p{n}@{name}"}).json["id"] for n in range(5)]
    seen: list[str] = []
    token = None
    while True:
        page = api.get(f"/v1/inboxes?domain={name}&limit=2"
                       + (f"&page_token={token}" if token else "")).json
        seen += [i["id"] for i in page["data"]]
        if not page["has_more"]:
            break
        token = page["next_page_token"]
    assert seen == made
