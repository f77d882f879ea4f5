"""Request and response bodies. The OpenAPI document's schemas are generated from these."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


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
    scopes: list[str] = Field(min_length=1, max_length=20)
    domains: list[str] = Field(default_factory=list, max_length=100)
    inboxes: list[str] = Field(default_factory=list, max_length=100)
    expires_at: datetime | None = None


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
