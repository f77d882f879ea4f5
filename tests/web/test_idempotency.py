"""Idempotency-Key on every POST: a repeat gets the first answer, another body 409, a
concurrent duplicate 409; kept in the database, so across restarts and processes."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable

import pytest

from tests.harness import Mailsuite
from tests.web.client import ApiClient


def domain_count(server: Mailsuite, name: str) -> int:
    return sum(1 for domain, _ in server.store.domain_list() if domain == name)


def test_a_repeat_gets_the_stored_answer_and_creates_nothing(api: ApiClient,
                                                             mailsuite: Mailsuite) -> None:
    key = secrets.token_hex(8)
    name = f"idem{secrets.token_hex(4)}.test"
    first = api.post("/v1/domains", {"name": name}, headers={"Idempotency-Key": key})
    assert first.status == 201 and first.headers.get("Idempotent-Replayed") is None
    again = api.post("/v1/domains", {"name": name}, headers={"Idempotency-Key": key})
    assert again.status == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json == first.json
    assert domain_count(mailsuite, name) == 1
    # Without the key, the same request is a new one: here a conflict.
    assert api.post("/v1/domains", {"name": name}).status == 409


def test_the_same_key_with_another_body_is_409_mismatch(api: ApiClient) -> None:
    key = secrets.token_hex(8)
    assert api.post("/v1/api-keys", {"name": "a", "scopes": ["keys:read"]},
                    headers={"Idempotency-Key": key}).status == 201
    reply = api.post("/v1/api-keys", {"name": "b", "scopes": ["keys:read"]},
                     headers={"Idempotency-Key": key})
    assert reply.status == 409 and reply.error_code == "idempotency_mismatch"


def test_refusals_are_replayed_too_and_keys_are_per_api_key(api: ApiClient,
                                                            mailsuite: Mailsuite) -> None:
    key = secrets.token_hex(8)
    body = {"address": "x@not-ours.test"}
    assert api.post("/v1/inboxes", body, headers={"Idempotency-Key": key}).status == 404
    replay = api.post("/v1/inboxes", body, headers={"Idempotency-Key": key})
    assert replay.status == 404 and replay.headers["Idempotent-Replayed"] == "true"
    _, other_secret = mailsuite.store.api_key_add("other", ["admin"])
    other = api.with_key(other_secret)
    assert other.post("/v1/inboxes", body, headers={"Idempotency-Key": key}).headers.get(
        "Idempotent-Replayed") is None


def test_an_overlong_key_is_refused(api: ApiClient) -> None:
    reply = api.post("/v1/api-keys", {"name": "a", "scopes": ["keys:read"]},
                     headers={"Idempotency-Key": "k" * 256})
    assert reply.status == 400 and reply.error_code == "invalid_request"


def test_concurrent_duplicates_run_once(api: ApiClient, mailsuite: Mailsuite) -> None:
    key = secrets.token_hex(8)
    name = f"race{secrets.token_hex(4)}.test"
    statuses: list[tuple[int, str | None]] = []
    start = threading.Barrier(6)

    def post() -> None:
        start.wait()
        reply = api.post("/v1/domains", {"name": name}, headers={"Idempotency-Key": key})
        statuses.append((reply.status, reply.json.get("error", {}).get("code")))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(statuses) == 6
    assert (201, None) in statuses
    assert set(statuses) <= {(201, None), (409, "idempotency_in_progress")}
    assert domain_count(mailsuite, name) == 1


@pytest.mark.parametrize("processes", [1, 2])
def test_keys_hold_across_a_restart_and_across_processes(
        processes: int, backend: str, start_mailsuite: Callable[..., Mailsuite]) -> None:
    if processes == 2 and backend == "sqlite":
        pytest.skip("two processes share a store on PostgreSQL; SQLite is one process's store")
    first = start_mailsuite()
    _, secret = first.store.api_key_add("admin", ["admin"])
    key = secrets.token_hex(8)
    name = f"restart{secrets.token_hex(4)}.test"
    created = ApiClient(first.http, secret).post("/v1/domains", {"name": name},
                                                 headers={"Idempotency-Key": key})
    assert created.status == 201
    if processes == 1:
        first.stop()
        second = first.start()
    else:
        second = start_mailsuite(db_url=first.db_url)
    replay = ApiClient(second.http, secret).post("/v1/domains", {"name": name},
                                                 headers={"Idempotency-Key": key})
    assert replay.status == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json == created.json
    assert domain_count(second, name) == 1
