"""API keys over HTTP: Bearer auth (401), scopes (403), reach (404), the error shape, and
the key lifecycle; every response is held to the server's OpenAPI document."""

from __future__ import annotations

import socket

import pytest

from tests.harness import Mailsuite
from tests.web.client import ApiClient


def make_key(api: ApiClient, **body: object) -> dict:
    reply = api.post("/v1/api-keys", {"name": "k", **body})
    assert reply.status == 201, reply.body
    return reply.json


def test_missing_malformed_unknown_and_revoked_keys_get_401(api: ApiClient) -> None:
    for key in (None, "", "ms_unknown", "not-even-prefixed"):
        reply = api.with_key(key).get("/v1/me")
        assert reply.status == 401 and reply.error_code == "unauthorized"
    reply = api.get("/v1/me", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert reply.status == 401
    made = make_key(api, scopes=["inboxes:read"])
    assert api.with_key(made["key"]).get("/v1/me").status == 200
    assert api.delete(f"/v1/api-keys/{made['id']}").json["revoked_at"] is not None
    assert api.with_key(made["key"]).get("/v1/me").status == 401


def test_a_key_without_the_scope_gets_403_and_write_implies_read(api: ApiClient) -> None:
    reader = api.with_key(make_key(api, scopes=["keys:read"])["key"])
    assert reader.get("/v1/api-keys").status == 200
    reply = reader.post("/v1/api-keys", {"name": "x", "scopes": ["keys:read"]})
    assert reply.status == 403 and reply.error_code == "forbidden"
    assert "keys:write" in reply.json["error"]["message"]
    writer = api.with_key(make_key(api, scopes=["keys:write"])["key"])
    assert writer.get("/v1/api-keys").status == 200
    other = api.with_key(make_key(api, scopes=["messages:read"])["key"])
    assert other.get("/v1/api-keys").status == 403


def test_create_shows_the_secret_once_and_me_describes_the_key(api: ApiClient,
                                                               mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    made = make_key(api, name="agent", scopes=["messages:send", "messages:read"],
                    domains=[domain.upper()], expires_at="2031-01-01T00:00:00Z")
    assert made["key"].startswith("ms_") and made["prefix"] == made["key"][:9]
    assert made["scopes"] == ["messages:read", "messages:send"]
    assert made["domains"] == [domain]
    assert made["expires_at"].startswith("2031-01-01T00:00:00")
    listed = api.get("/v1/api-keys?limit=100").json["data"]
    assert made["id"] in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)
    assert "key" not in api.get(f"/v1/api-keys/{made['id']}").json
    me = api.with_key(made["key"]).get("/v1/me").json
    assert me == {"id": made["id"], "name": "agent", "scopes": made["scopes"],
                  "domains": [domain], "inboxes": [], "expires_at": made["expires_at"]}


def test_a_key_cannot_create_or_see_a_key_with_more_power(api: ApiClient,
                                                          mailsuite: Mailsuite) -> None:
    mine, theirs = mailsuite.new_domain(), mailsuite.new_domain()
    narrow = api.with_key(make_key(api, scopes=["keys:write", "messages:read"],
                                   domains=[mine])["key"])
    for body in ({"scopes": ["admin"], "domains": [mine]},
                 {"scopes": ["messages:send"], "domains": [mine]},
                 {"scopes": ["messages:read"]},
                 {"scopes": ["messages:read"], "domains": [theirs]},
                 {"scopes": ["messages:read"], "inboxes": [f"x@{theirs}"]}):
        reply = narrow.post("/v1/api-keys", {"name": "escalate", **body})
        assert reply.status == 403, (body, reply.body)
    inner = narrow.post("/v1/api-keys", {"name": "ok", "scopes": ["messages:read"],
                                         "domains": [mine]})
    assert inner.status == 201
    # The admin's own key and a key for the other domain are invisible to the narrow key.
    outsider = make_key(api, scopes=["messages:read"], domains=[theirs])
    seen = {k["id"] for k in narrow.get("/v1/api-keys?limit=100").json["data"]}
    assert inner.json["id"] in seen and outsider["id"] not in seen
    for method, path in (("GET", f"/v1/api-keys/{outsider['id']}"),
                         ("DELETE", f"/v1/api-keys/{outsider['id']}"),
                         ("POST", f"/v1/api-keys/{outsider['id']}/rotate")):
        reply = narrow.request(method, path)
        assert reply.status == 404 and reply.error_code == "not_found", (method, path)
    assert api.with_key(outsider["key"]).get("/v1/me").status == 200


def test_rotate_gives_a_new_secret_and_kills_the_old(api: ApiClient) -> None:
    made = make_key(api, scopes=["inboxes:read"])
    rotated = api.post(f"/v1/api-keys/{made['id']}/rotate")
    assert rotated.status == 200 and rotated.json["id"] == made["id"]
    assert rotated.json["key"] != made["key"]
    assert api.with_key(made["key"]).get("/v1/me").status == 401
    assert api.with_key(rotated.json["key"]).get("/v1/me").status == 200


def test_lists_page_by_keyset(api: ApiClient) -> None:
    made = [make_key(api, name=f"page-{n}", scopes=["threads:read"])["id"] for n in range(5)]
    seen: list[str] = []
    token = None
    while True:
        path = "/v1/api-keys?limit=2" + (f"&page_token={token}" if token else "")
        page = api.get(path).json
        assert len(page["data"]) <= 2
        seen += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            assert page["next_page_token"] is None
            break
        token = page["next_page_token"]
    assert seen == sorted(seen) and set(made) <= set(seen)
    for bad in ("limit=0", "limit=101", "limit=ten"):
        reply = api.get(f"/v1/api-keys?{bad}")
        assert reply.status == 400 and reply.json["error"]["param"] == "limit", bad


@pytest.mark.parametrize(("raw", "content_type", "status", "code", "param"), [
    (b"{not json", "application/json", 400, "invalid_json", None),
    (b'{"name": "x"}', "text/plain", 415, "unsupported_media_type", None),
    (b'{"name": 5, "scopes": ["admin"]}', "application/json", 400, "invalid_body", "name"),
    (b'{"name": "x", "scopes": "admin"}', "application/json", 400, "invalid_body", "scopes"),
    (b'{"name": "x", "scopes": ["admin"], "colour": 1}', "application/json", 400,
     "unknown_field", "colour"),
    (b'{"name": "x", "scopes": ["superuser"]}', "application/json", 400, "invalid_body",
     "scopes.0"),
    (b'{"name": "x", "scopes": ["admin"], "domains": ["nowhere.test"]}', "application/json",
     404, "not_found", None),
])
def test_bad_bodies_get_json_errors_naming_the_field(api: ApiClient, raw: bytes,
                                                     content_type: str, status: int, code: str,
                                                     param: str | None) -> None:
    reply = api.post("/v1/api-keys", raw=raw, headers={"Content-Type": content_type})
    assert (reply.status, reply.error_code) == (status, code), reply.body
    assert reply.json["error"].get("param") == param


def test_unknown_paths_wrong_methods_and_path_tricks_are_json_errors(api: ApiClient) -> None:
    for path in ("/v1/nothing", "/v1/api-keys/../me", "/v1/api-keys/%2e%2e%2fme/rotate",
                 "/v1/api-keys/key_00000000000000000000000000"):
        reply = api.get(path, check=False)
        assert reply.status == 404 and reply.error_code == "not_found", path
    reply = api.request("PUT", "/v1/me", check=False)
    assert reply.status == 405 and reply.error_code == "method_not_allowed"


def test_an_oversized_body_is_refused_with_413_before_it_is_read(
        mailsuite: Mailsuite, api: ApiClient) -> None:
    announced = 200 * 1024 * 1024
    with socket.create_connection(mailsuite.http, timeout=10) as sock:
        sock.sendall(b"POST /v1/api-keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nAuthorization: Bearer " + api.key.encode() +
                     b"\r\nContent-Length: %d\r\n\r\n{" % announced)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"code": "payload_too_large"' in answer


def test_healthz_and_the_document_need_no_key(mailsuite: Mailsuite) -> None:
    client = ApiClient(mailsuite.http)
    assert client.get("/healthz").json == {"status": "ok"}
    document = client.document
    assert document["openapi"] == "3.1.0"
    assert {"/v1/api-keys", "/v1/api-keys/{key_id}", "/v1/api-keys/{key_id}/rotate",
            "/v1/me", "/healthz"} <= set(document["paths"])


def test_times_need_a_zone_and_come_back_in_utc(api: ApiClient) -> None:
    # Found by schemathesis: PostgreSQL refuses offsets past 15:59, so times are kept in UTC.
    made = make_key(api, scopes=["keys:read"], expires_at="9459-05-25T15:54:56.65+18:23")
    assert made["expires_at"] == "9459-05-24T21:31:56.650000Z"
    reply = api.post("/v1/api-keys", {"name": "x", "scopes": ["keys:read"],
                                      "expires_at": "2030-01-01T00:00:00"})
    assert reply.status == 400 and reply.json["error"]["param"] == "expires_at"
