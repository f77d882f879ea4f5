"""Aliases over the API, with the CLI's rules: a source (or @domain catch-all) of one of our
domains, pointing at any addresses; a key reaches the aliases of the domains it reaches."""

from __future__ import annotations

from mailsuite.addresses import AddressError
from mailsuite.store import AliasRow, Conflict, NotFound
from mailsuite.web.api import Api, ApiError, Call, not_found, page_of
from mailsuite.web.models import Alias, AliasCreate, AliasList, ListQuery


def _alias(row: AliasRow) -> Alias:
    return Alias(id=row.api_id, source=row.source, destinations=list(row.destinations))


def register(api: Api) -> None:
    @api.operation("POST", "/v1/aliases", scope="domains:write", status=201, body=AliasCreate,
                   response=Alias, tag="aliases",
                   errors={409: "an account has that address, or the alias has those "
                           "destinations already"},
                   summary="Add an alias, or destinations to an existing one")
    async def create_alias(call: Call, body: AliasCreate) -> Alias:
        domain = body.source.strip().lower().rpartition("@")[2]
        if not call.reaches_domain(domain):
            raise not_found("domain")
        try:
            return _alias(await call.store.alias_add(body.source, body.destinations))
        except AddressError as exc:
            raise ApiError(400, "invalid_body", str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, "invalid_body", str(exc), "destinations") from None
        except NotFound:
            raise not_found("domain") from None
        except Conflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None

    @api.operation("GET", "/v1/aliases", scope="domains:read", query=ListQuery,
                   response=AliasList, summary="List aliases", tag="aliases")
    async def list_aliases(call: Call) -> AliasList:
        assert isinstance(call.query, ListQuery) and call.key is not None
        domains = None if call.unrestricted else list(call.key.domains)
        rows = await call.store.alias_page(call.query.page_token, call.query.limit + 1, domains)
        page, more = page_of(rows, call.query.limit, lambda row: row.api_id)
        return AliasList(data=[_alias(r) for r in page], **more)

    @api.operation("DELETE", "/v1/aliases/{alias}", scope="domains:write", status=204,
                   summary="Remove an alias (by id or source) with all its destinations",
                   tag="aliases")
    async def delete_alias(call: Call) -> None:
        row = await call.store.alias_find(call.params["alias"])
        if row is None or not call.reaches_domain(row.source.rpartition("@")[2]):
            raise not_found("alias")
        try:
            await call.store.alias_remove(row.source)
        except NotFound:
            raise not_found("alias") from None
