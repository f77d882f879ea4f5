"""Request and response bodies. The OpenAPI document's schemas are generated from these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from mailsuite.apikeys import Scope


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


#: a time with its zone, as RFC 3339 asks; stored and answered in UTC
UtcTime = Annotated[AwareDatetime, AfterValidator(_utc)]


class Body(BaseModel):
    """A request body: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ListQuery(Body):
    limit: int = Field(20, ge=1, le=100)
    page_token: str | None = Field(None, max_length=100)


class Health(BaseModel):
    status: str


class ApiKeyCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    scopes: list[Scope] = Field(min_length=1, max_length=20)
    domains: list[str] = Field(default_factory=list, max_length=100)
    inboxes: list[str] = Field(default_factory=list, max_length=100)
    expires_at: UtcTime | None = None


class ApiKeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    domains: list[str]
    inboxes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="the secret; shown only in this response")


class ApiKeyList(BaseModel):
    data: list[ApiKeyOut]
    next_page_token: str | None
    has_more: bool


class Me(BaseModel):
    id: str
    name: str
    scopes: list[str]
    domains: list[str]
    inboxes: list[str]
    expires_at: datetime | None


class DnsRecord(BaseModel):
    type: str
    name: str
    value: str = Field(description="the whole value; a long TXT is split into 255-octet "
                       "strings when published")


class DomainCreate(Body):
    name: str = Field(min_length=1, max_length=253)


class DomainSummary(BaseModel):
    id: str
    name: str
    status: Literal["pending", "verified"]
    created_at: datetime
    verified_at: datetime | None


class Domain(DomainSummary):
    records: list[DnsRecord]


class DomainList(BaseModel):
    data: list[DomainSummary]
    next_page_token: str | None
    has_more: bool


class DnsRecordList(BaseModel):
    data: list[DnsRecord]


class DnsRecordCheck(DnsRecord):
    status: Literal["verified", "missing", "mismatch", "temperror"]
    found: list[str] = Field(description="what is published there, for a mismatch")


class DomainVerification(BaseModel):
    domain: DomainSummary
    records: list[DnsRecordCheck]


class DeleteQuery(Body):
    force: bool = False


class InboxCreate(Body):
    address: str | None = Field(None, max_length=320)
    local_part: str | None = Field(None, max_length=64)
    domain: str | None = Field(None, max_length=253)
    display_name: str | None = Field(None, max_length=200)
    password: str | None = Field(None, min_length=1, max_length=72,
                                 description="omit for an inbox reached with API keys only")

    @model_validator(mode="after")
    def _one_address(self) -> InboxCreate:
        if (self.address is None) == (self.local_part is None or self.domain is None):
            raise ValueError("give either address, or local_part and domain")
        return self


class InboxUpdate(Body):
    display_name: str | None = Field(None, max_length=200)
    password: str | None = Field(None, min_length=1, max_length=72)


class Inbox(BaseModel):
    id: str
    address: str
    display_name: str | None
    created_at: datetime


class Folder(BaseModel):
    name: str
    special_use: str | None
    messages: int
    unread: int
    size: int


class InboxDetail(Inbox):
    folders: list[Folder]
    messages: int
    unread: int
    storage_used: int


class InboxList(BaseModel):
    data: list[Inbox]
    next_page_token: str | None
    has_more: bool


class InboxListQuery(ListQuery):
    domain: str | None = Field(None, max_length=253)


class FolderCreate(Body):
    name: str = Field(min_length=1, max_length=900)


class FolderList(BaseModel):
    data: list[Folder]


class AliasCreate(Body):
    source: str = Field(min_length=3, max_length=320,
                        description="local@domain, or @domain for a catch-all")
    destinations: list[str] = Field(min_length=1, max_length=100)


class Alias(BaseModel):
    id: str
    source: str
    destinations: list[str]


class AliasList(BaseModel):
    data: list[Alias]
    next_page_token: str | None
    has_more: bool


class AttachmentIn(Body):
    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field("application/octet-stream", max_length=255)
    content: str = Field(description="the file, base64")
    content_id: str | None = Field(None, max_length=200)
    inline: bool = False


Addresses = str | list[str]


class SendRequest(Body):
    to: Addresses
    cc: Addresses | None = None
    bcc: Addresses | None = None
    reply_to: Addresses | None = None
    subject: str = Field("", max_length=998)
    text: str | None = None
    html: str | None = None
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=100)
    headers: dict[str, str] = Field(default_factory=dict, max_length=50)


class RecipientStatus(BaseModel):
    address: str
    status: Literal["delivered", "queued"] = Field(
        description="delivered: stored in a local inbox; queued: for a remote server")


class SendResult(BaseModel):
    queue_id: str
    message_id: str = Field(description="the RFC 5322 Message-ID, without <>")
    status: Literal["queued"]
    recipients: list[RecipientStatus]
