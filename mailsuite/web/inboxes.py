"""Inboxes over the API. An inbox is an account: the same folders, IMAP, POP3 and SMTP."""

from __future__ import annotations

from twisted.internet import threads

from mailsuite.addresses import AddressError, parse_account_address
from mailsuite.passwords import PasswordError, hash_password
from mailsuite.store import NO_PASSWORD, Conflict, InboxRow, NotFound, StoreError
from mailsuite.web.api import Api, ApiError, Call, not_found, page_of
from mailsuite.web.models import (
    Folder,
    FolderCreate,
    FolderList,
    Inbox,
    InboxCreate,
    InboxDetail,
    InboxList,
    InboxListQuery,
    InboxUpdate,
)


def _inbox(row: InboxRow) -> Inbox:
    return Inbox(id=row.api_id, address=row.address, display_name=row.display_name,
                 created_at=row.created_at)


async def reached_inbox(call: Call, ref: str) -> InboxRow:
    """The inbox (by id or address) if the caller's key reaches it; 404 otherwise."""
    row = await call.store.inbox_find(ref)
    if row is None or not call.reaches_inbox(row.address):
        raise not_found("inbox")
    return row


async def _hash(call: Call, password: str) -> str:
    try:
        return await threads.deferToThread(hash_password, password,
                                           call.config.auth.bcrypt_rounds)
    except PasswordError as exc:
        raise ApiError(400, "invalid_body", str(exc), "password") from None


async def _folders(call: Call, row: InboxRow) -> list[Folder]:
    return [Folder(name=u.name, special_use=u.special_use, messages=u.messages, unread=u.unread,
                   size=u.size) for u in await call.store.mailbox_usage(row.id)]


def register(api: Api) -> None:
    @api.operation("POST", "/v1/inboxes", scope="inboxes:write", status=201, body=InboxCreate,
                   response=Inbox, tag="inboxes", errors={409: "the address exists already"},
                   summary="Create an inbox: at once an IMAP, POP3 and SMTP account")
    async def create_inbox(call: Call, body: InboxCreate) -> Inbox:
        text = body.address or f"{body.local_part}@{body.domain}"
        try:
            address = parse_account_address(text)
        except AddressError as exc:
            raise ApiError(400, "invalid_body", str(exc),
                           "address" if body.address else "local_part") from None
        if not call.reaches_domain(address.domain):
            raise not_found("domain")
        hashed = await _hash(call, body.password) if body.password else NO_PASSWORD
        try:
            await call.store.account_add(address.normal, hashed, body.display_name)
        except NotFound:
            raise not_found("domain") from None
        except Conflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        row = await call.store.inbox_find(address.normal)
        assert row is not None
        return _inbox(row)

    @api.operation("GET", "/v1/inboxes", scope="inboxes:read", query=InboxListQuery,
                   response=InboxList, summary="List inboxes", tag="inboxes")
    async def list_inboxes(call: Call) -> InboxList:
        assert isinstance(call.query, InboxListQuery) and call.key is not None
        query = call.query
        reach = None if call.unrestricted else (call.key.domains, call.key.inboxes)
        domain = query.domain.strip().lower() if query.domain else None
        rows = await call.store.inbox_page(query.page_token, query.limit + 1, domain, reach)
        page, more = page_of(rows, query.limit, lambda row: row.api_id)
        return InboxList(data=[_inbox(r) for r in page], **more)

    @api.operation("GET", "/v1/inboxes/{inbox}", scope="inboxes:read", response=InboxDetail,
                   summary="One inbox, by id or address, with its folders and usage",
                   tag="inboxes")
    async def get_inbox(call: Call) -> InboxDetail:
        row = await reached_inbox(call, call.params["inbox"])
        folders = await _folders(call, row)
        return InboxDetail(**_inbox(row).model_dump(), folders=folders,
                           messages=sum(f.messages for f in folders),
                           unread=sum(f.unread for f in folders),
                           storage_used=sum(f.size for f in folders))

    @api.operation("PATCH", "/v1/inboxes/{inbox}", scope="inboxes:write", body=InboxUpdate,
                   response=Inbox, summary="Change the display name or the password",
                   tag="inboxes")
    async def update_inbox(call: Call, body: InboxUpdate) -> Inbox:
        row = await reached_inbox(call, call.params["inbox"])
        try:
            if "password" in body.model_fields_set:
                if body.password is None:
                    raise ApiError(400, "invalid_body", "password cannot be null", "password")
                await call.store.account_set_password(row.address,
                                                      await _hash(call, body.password))
            if "display_name" in body.model_fields_set:
                await call.store.account_set_display_name(row.address, body.display_name)
        except NotFound:
            raise not_found("inbox") from None
        return _inbox(await reached_inbox(call, row.api_id))

    @api.operation("DELETE", "/v1/inboxes/{inbox}", scope="inboxes:write", status=204,
                   summary="Remove the inbox and all its mail", tag="inboxes")
    async def delete_inbox(call: Call) -> None:
        row = await reached_inbox(call, call.params["inbox"])
        try:
            await call.store.account_remove(row.address)
        except NotFound:
            raise not_found("inbox") from None

    @api.operation("GET", "/v1/inboxes/{inbox}/folders", scope="inboxes:read",
                   response=FolderList, summary="The inbox's folders (its IMAP mailboxes)",
                   tag="inboxes")
    async def list_folders(call: Call) -> FolderList:
        inbox = await reached_inbox(call, call.params["inbox"])
        return FolderList(data=await _folders(call, inbox))

    @api.operation("POST", "/v1/inboxes/{inbox}/folders", scope="inboxes:write", status=201,
                   body=FolderCreate, response=Folder, tag="inboxes",
                   errors={409: "the folder exists already"},
                   summary="Create a folder (and missing parents; / separates levels)")
    async def create_folder(call: Call, body: FolderCreate) -> Folder:
        row = await reached_inbox(call, call.params["inbox"])
        try:
            await call.store.mailbox_create(row.id, body.name)
        except Conflict as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        except StoreError as exc:
            raise ApiError(400, "invalid_body", str(exc), "name") from None
        created = [f for f in await _folders(call, row) if f.name == body.name]
        if not created:
            raise not_found("inbox")
        return created[0]
