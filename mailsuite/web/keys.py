"""API keys over the API: create, list, read, revoke, rotate; and /v1/me.

A key sees, and may create, only keys with no more power than itself: scopes it holds and a
reach inside its own. Any other key is 404, as if it did not exist.
"""

from __future__ import annotations

from mailsuite import apikeys
from mailsuite.store import ApiKey, NotFound
from mailsuite.web.api import ANY_KEY, Api, ApiError, Call, not_found, page_of
from mailsuite.web.models import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyList,
    ApiKeyOut,
    ListQuery,
    Me,
)


def _within(caller: ApiKey, scopes: list[str] | tuple[str, ...], domains: list[str] |
            tuple[str, ...], inboxes: list[str] | tuple[str, ...]) -> bool:
    return (all(apikeys.grants(caller.scopes, scope) for scope in scopes)
            and apikeys.reach_within(caller.domains, caller.inboxes, domains, inboxes))


def _visible(caller: ApiKey, key: ApiKey) -> bool:
    return _within(caller, key.scopes, key.domains, key.inboxes)


def _out(key: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(id=key.id, name=key.name, prefix=key.prefix, scopes=list(key.scopes),
                     domains=list(key.domains), inboxes=list(key.inboxes),
                     created_at=key.created_at, expires_at=key.expires_at,
                     revoked_at=key.revoked_at)


async def _get_visible(call: Call, key_id: str) -> ApiKey:
    assert call.key is not None
    key = await call.store.api_key_get(key_id)
    if key is None or not _visible(call.key, key):
        raise not_found("key")
    return key


def register(api: Api) -> None:
    @api.operation("POST", "/v1/api-keys", scope="keys:write", status=201, body=ApiKeyCreate,
                   response=ApiKeyCreated, summary="Create a key; its secret is shown once",
                   tag="keys")
    async def create_api_key(call: Call, body: ApiKeyCreate) -> ApiKeyCreated:
        assert call.key is not None
        try:
            scopes = apikeys.check_scopes(body.scopes)
        except ValueError as exc:
            raise ApiError(400, "invalid_body", str(exc), "scopes") from None
        domains = [d.strip().lower() for d in body.domains]
        inboxes = [a.strip().lower() for a in body.inboxes]
        if not all(apikeys.grants(call.key.scopes, s) for s in scopes):
            raise ApiError(403, "forbidden", "a key cannot grant a scope it does not hold")
        if not apikeys.reach_within(call.key.domains, call.key.inboxes, domains, inboxes):
            raise ApiError(403, "forbidden", "a key cannot reach further than the key that "
                           "creates it")
        try:
            key, secret = await call.store.api_key_add(body.name, scopes, domains, inboxes,
                                                       body.expires_at)
        except NotFound as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, "invalid_body", str(exc)) from None
        return ApiKeyCreated(**_out(key).model_dump(), key=secret)

    @api.operation("GET", "/v1/api-keys", scope="keys:read", query=ListQuery,
                   response=ApiKeyList, summary="List keys (never their secrets)", tag="keys")
    async def list_api_keys(call: Call) -> ApiKeyList:
        assert call.key is not None and isinstance(call.query, ListQuery)
        query = call.query
        # Keys are few; they are filtered by what the caller may see, then paged by id.
        keys = [k for k in await call.store.api_key_list() if _visible(call.key, k)
                and (query.page_token is None or k.id > query.page_token)]
        page, more = page_of(keys, query.limit, lambda key: key.id)
        return ApiKeyList(data=[_out(k) for k in page], **more)

    @api.operation("GET", "/v1/api-keys/{key_id}", scope="keys:read", response=ApiKeyOut,
                   summary="One key", tag="keys")
    async def get_api_key(call: Call) -> ApiKeyOut:
        return _out(await _get_visible(call, call.params["key_id"]))

    @api.operation("DELETE", "/v1/api-keys/{key_id}", scope="keys:write", response=ApiKeyOut,
                   summary="Revoke a key at once, in every process", tag="keys")
    async def revoke_api_key(call: Call) -> ApiKeyOut:
        key = await _get_visible(call, call.params["key_id"])
        try:
            return _out(await call.store.api_key_revoke(key.id))
        except NotFound:
            raise not_found("key") from None

    @api.operation("POST", "/v1/api-keys/{key_id}/rotate", scope="keys:write",
                   response=ApiKeyCreated, summary="A new secret; the old one stops working",
                   tag="keys")
    async def rotate_api_key(call: Call) -> ApiKeyCreated:
        key = await _get_visible(call, call.params["key_id"])
        try:
            rotated, secret = await call.store.api_key_rotate(key.id)
        except NotFound:
            raise not_found("key") from None
        return ApiKeyCreated(**_out(rotated).model_dump(), key=secret)

    @api.operation("GET", "/v1/me", scope=ANY_KEY, response=Me,
                   summary="The calling key", tag="keys")
    async def get_me(call: Call) -> Me:
        assert call.key is not None
        key = call.key
        return Me(id=key.id, name=key.name, scopes=list(key.scopes), domains=list(key.domains),
                  inboxes=list(key.inboxes), expires_at=key.expires_at)
