"""Domains over the API: the same domains, DKIM keys and DNS records as `mailsuite domain`."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.internet import threads

from mailsuite import dkim, dnscheck
from mailsuite.addresses import AddressError
from mailsuite.store import Conflict, DomainRow, InUse, NotFound
from mailsuite.web.api import Api, ApiError, Call, not_found, page_of
from mailsuite.web.models import (
    DeleteQuery,
    DnsRecord,
    DnsRecordCheck,
    DnsRecordList,
    Domain,
    DomainCreate,
    DomainList,
    DomainSummary,
    DomainVerification,
    ListQuery,
)


def _summary(row: DomainRow) -> DomainSummary:
    return DomainSummary(id=row.api_id, name=row.name, created_at=row.created_at,
                         verified_at=row.verified_at,
                         status="verified" if row.verified_at else "pending")


async def _zone(call: Call, name: str) -> list[tuple[str, str, str]]:
    keys = [dkim.DKIMKey(k.domain, k.selector, k.algorithm, k.private_key)
            for k in await call.store.dkim_keys(name)]
    # Deriving a public key loads the private PEM: CPU work, kept off the reactor.
    return await threads.deferToThread(dkim.dns_records, name, call.config.server.hostname,
                                       keys)


async def _records(call: Call, name: str) -> list[DnsRecord]:
    return [DnsRecord(type=rtype, name=owner, value=value)
            for owner, rtype, value in await _zone(call, name)]


async def _reached(call: Call, ref: str) -> DomainRow:
    row = await call.store.domain_find(ref)
    if row is None or not call.reaches_domain(row.name):
        raise not_found("domain")
    return row


def register(api: Api) -> None:
    @api.operation("POST", "/v1/domains", scope="domains:write", status=201, body=DomainCreate,
                   response=Domain, tag="domains", errors={409: "the domain exists already"},
                   summary="Add a domain with its DKIM key; returns the records to publish")
    async def create_domain(call: Call, body: DomainCreate) -> Domain:
        if not call.unrestricted:
            raise ApiError(403, "forbidden", "a key restricted to domains or inboxes cannot "
                           "add a domain")
        config = call.config.dkim
        keys = await threads.deferToThread(dkim.new_domain_keys, body.name.strip().lower(),
                                           config.rsa_bits, config.ed25519)
        try:
            row = await call.store.domain_add(
                body.name, [(k.selector, k.algorithm, k.private_key) for k in keys])
        except AddressError as exc:
            raise ApiError(400, "invalid_body", str(exc), "name") from None
        except Conflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        return Domain(**_summary(row).model_dump(), records=await _records(call, row.name))

    @api.operation("GET", "/v1/domains", scope="domains:read", query=ListQuery,
                   response=DomainList, summary="List domains", tag="domains")
    async def list_domains(call: Call) -> DomainList:
        assert isinstance(call.query, ListQuery) and call.key is not None
        names = None if call.unrestricted else list(call.key.domains)
        rows = await call.store.domain_page(call.query.page_token, call.query.limit + 1, names)
        page, more = page_of(rows, call.query.limit, lambda row: row.api_id)
        return DomainList(data=[_summary(r) for r in page], **more)

    @api.operation("GET", "/v1/domains/{domain}", scope="domains:read", response=Domain,
                   summary="One domain, by id or name, with its records", tag="domains")
    async def get_domain(call: Call) -> Domain:
        row = await _reached(call, call.params["domain"])
        return Domain(**_summary(row).model_dump(), records=await _records(call, row.name))

    @api.operation("GET", "/v1/domains/{domain}/records", scope="domains:read",
                   response=DnsRecordList, tag="domains",
                   summary="The DNS records to publish: MX, SPF, DKIM and DMARC")
    async def get_domain_records(call: Call) -> DnsRecordList:
        row = await _reached(call, call.params["domain"])
        return DnsRecordList(data=await _records(call, row.name))

    @api.operation("POST", "/v1/domains/{domain}/verify", scope="domains:write",
                   response=DomainVerification, tag="domains",
                   summary="Look every record up through the configured resolver; the domain "
                   "is verified when its MX, SPF and DKIM records match")
    async def verify_domain(call: Call) -> DomainVerification:
        row = await _reached(call, call.params["domain"])
        checks = await threads.deferToThread(dnscheck.check_records, call.resolver,
                                             await _zone(call, row.name))
        outcome = dnscheck.verified(checks)
        if outcome is not None:  # a temporary failure changes nothing
            row = await call.store.domain_set_verified(
                row.name, datetime.now(UTC) if outcome else None)
        return DomainVerification(domain=_summary(row), records=[
            DnsRecordCheck(type=c.type, name=c.name, value=c.value, status=c.status,
                           found=list(c.found)) for _, c in checks])

    @api.operation("DELETE", "/v1/domains/{domain}", scope="domains:write", status=204,
                   query=DeleteQuery, tag="domains",
                   errors={409: "the domain has inboxes (force=true removes them and their mail)"},
                   summary="Remove a domain")
    async def delete_domain(call: Call) -> None:
        assert isinstance(call.query, DeleteQuery)
        row = await _reached(call, call.params["domain"])
        try:
            await call.store.domain_remove(row.name, force=call.query.force)
        except InUse as exc:
            raise ApiError(409, "conflict", str(exc).replace("--force", "force=true")) from None
        except NotFound:
            raise not_found("domain") from None
