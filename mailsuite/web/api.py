"""One registry of API operations: it routes (Klein), validates (pydantic), authorises (API
keys and scopes) and describes itself (OpenAPI 3.1), so the document cannot drift from the code.

A handler is `async def handler(call, body?) -> model`; it raises ApiError for a refusal.
Everything else that goes wrong is a 500 with a request id, never a traceback to the client.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from klein import Klein
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from twisted.internet import defer
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from mailsuite import apikeys, metrics
from mailsuite.config import Config
from mailsuite.ids import new_id
from mailsuite.sending import SigningKeys
from mailsuite.store import ApiKey, AsyncStore
from mailsuite.web.models import ErrorResponse
from mailsuite.web.ratelimit import RateLimiter

log = Logger(namespace="mailsuite.web")
JSON = "application/json"
T = TypeVar("T")
#: the scope of operations any valid key may call
ANY_KEY = "*"

#: error responses every authenticated operation may give, for the document
_ERRORS = {
    "400": "malformed request", "401": "missing, unknown, revoked or expired key",
    "403": "the key lacks the scope", "404": "no such resource within the key's reach",
    "429": "too many requests for this key (Retry-After says when to retry)",
    "413": "body over the limit", "415": "body is not JSON",
}


class ApiError(Exception):
    """A refusal the client should see: HTTP status, a stable code, a message."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


def page_of(rows: Sequence[T], limit: int, id_of: Callable[[T], str]
            ) -> tuple[list[T], dict[str, Any]]:
    """rows fetched with limit + 1 → (the page, its has_more and next_page_token)."""
    page = list(rows[:limit])
    more = len(rows) > limit
    return page, {"has_more": more, "next_page_token": id_of(page[-1]) if more else None}


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"no such {what}")


@dataclass(frozen=True)
class Services:
    """What every operation may use besides its request."""

    store: AsyncStore
    config: Config
    resolver: Any  # dns.resolver.Resolver: the process's, as configured
    limiter: RateLimiter | None
    signing_keys: SigningKeys
    queued: Callable[[], None]  # wakes the queue's workers after a commit that queued mail


@dataclass
class Call:
    """What a handler gets: the request, the caller's key, path and query parameters, and
    the services every operation may use."""

    request: Any
    services: Services
    key: ApiKey | None
    params: dict[str, str]
    query: BaseModel | None = None

    @property
    def store(self) -> AsyncStore:
        return self.services.store

    @property
    def config(self) -> Config:
        return self.services.config

    @property
    def resolver(self) -> Any:
        return self.services.resolver

    @property
    def unrestricted(self) -> bool:
        return self.key is not None and not (self.key.domains or self.key.inboxes)

    def reaches_domain(self, name: str) -> bool:
        return self.key is not None and apikeys.reaches_domain(self.key.domains,
                                                               self.key.inboxes, name)

    def reaches_inbox(self, address: str) -> bool:
        return self.key is not None and apikeys.reaches_inbox(self.key.domains,
                                                              self.key.inboxes, address)


@dataclass(frozen=True)
class Raw:
    """A result that is not JSON: its bytes and media type."""

    body: bytes
    content_type: str


#: a handler returns a model, plain JSON data for an operation without a response model, or Raw
Handler = Callable[..., Awaitable[BaseModel | dict[str, Any] | Raw | None]]


@dataclass
class Operation:
    method: str
    path: str  # OpenAPI form: /v1/api-keys/{key_id}
    handler: Handler
    scope: str | None  # None: no key needed
    summary: str
    status: int
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: type[BaseModel] | None
    tag: str
    errors: dict[int, str]  # refusals of this operation beyond the common ones
    media: str | None  # the media type of a Raw answer

    @property
    def operation_id(self) -> str:
        return self.handler.__name__

    @property
    def idempotent(self) -> bool:
        """Every POST (they create or send) takes an Idempotency-Key."""
        return self.method == "POST" and self.scope is not None


@dataclass
class Api:
    title: str
    version: str
    operations: list[Operation] = field(default_factory=list)

    def operation(self, method: str, path: str, *, scope: str | None, summary: str,
                  status: int = 200, body: type[BaseModel] | None = None,
                  query: type[BaseModel] | None = None,
                  response: type[BaseModel] | None = None, tag: str = "api",
                  errors: dict[int, str] | None = None,
                  media: str | None = None) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.operations.append(Operation(method, path, handler, scope, summary, status,
                                             body, query, response, tag, errors or {}, media))
            return handler
        return register

    # --- serving ---------------------------------------------------------------------------
    def klein(self, services: Services) -> Klein:
        app = Klein()
        for op in self.operations:
            route = re.sub(r"\{(\w+)\}", r"<string:\1>", op.path)
            app.route(route, methods=[op.method], branch=False,
                      endpoint=op.operation_id)(self._endpoint(op, services))

        @app.handle_errors(NotFound)
        def unknown(request: Any, failure: Any) -> bytes:
            return _unmatched(request, ApiError(404, "not_found", "no such endpoint"))

        @app.handle_errors(MethodNotAllowed)
        def wrong_method(request: Any, failure: Any) -> bytes:
            return _unmatched(request, ApiError(405, "method_not_allowed",
                                                "this endpoint does not take that method"))
        return app

    def _endpoint(self, op: Operation, services: Services) -> Callable[..., Any]:
        def endpoint(request: Any, **params: str) -> defer.Deferred:
            return defer.ensureDeferred(self._dispatch(op, services, request, params))
        return endpoint

    async def _dispatch(self, op: Operation, services: Services, request: Any,
                        params: dict[str, str]) -> bytes:
        request_id(request)
        started = time.monotonic()
        try:
            key = await authenticate(request, services.store, op.scope) if op.scope else None
            if key is not None and services.limiter is not None:
                _limit(request, services.limiter, key.id)
        except ApiError as refusal:
            status, body, content_type = refusal.status, _error_body(request, refusal), JSON
        else:
            call = Call(request, services, key, params)
            idempotency_key = request.getHeader("idempotency-key") if op.idempotent else None
            if key is None or idempotency_key is None:
                status, body, content_type = await self._run(op, call)
            else:
                status, body = await self._run_once(op, call, idempotency_key)
                content_type = JSON
        request.setResponseCode(status)
        if body:
            request.setHeader("Content-Type", content_type)
        metrics.HTTP_REQUESTS.labels(op.path, op.method, str(status)).inc()
        metrics.HTTP_SECONDS.labels(op.path, op.method).observe(time.monotonic() - started)
        return body

    async def _run(self, op: Operation, call: Call) -> tuple[int, bytes, str]:
        """The operation's (status, body, media type); refusals and failures as JSON errors."""
        request = call.request
        try:
            if op.query is not None:
                call.query = _validate(op.query, _query_args(request), "query")
            args: list[Any] = [call]
            if op.body is not None:
                args.append(_validate(op.body, _json_body(request), "body"))
            result = await op.handler(*args)
        except ApiError as refusal:
            return refusal.status, _error_body(request, refusal), JSON
        except Exception:
            log.failure("{method} {path} failed (request {id})", method=op.method,
                        path=op.path, id=request_id(request))
            return 500, _error_body(request, ApiError(
                500, "internal_error", "the server failed; the request id names it")), JSON
        if result is None:
            return op.status, b"", JSON
        if isinstance(result, Raw):
            return op.status, result.body, result.content_type
        data = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        return op.status, json.dumps(data, separators=(",", ":")).encode("utf-8"), JSON

    async def _run_once(self, op: Operation, call: Call, idempotency_key: str
                        ) -> tuple[int, bytes]:
        """Run under an Idempotency-Key: a repeat with the same body gets the stored answer."""
        assert call.key is not None
        request = call.request
        if not 0 < len(idempotency_key) <= 255:
            return 400, _error_body(request, ApiError(
                400, "invalid_request", "Idempotency-Key must be 1 to 255 characters"))
        request.content.seek(0)
        fingerprint = hashlib.sha256(b"\0".join(
            (op.method.encode(), request.path, request.content.read()))).hexdigest()
        begun = await call.store.idempotency_begin(call.key.id, idempotency_key, fingerprint)
        if begun.outcome == "replay":
            request.setHeader("Idempotent-Replayed", "true")
            return begun.status, begun.body
        if begun.outcome == "mismatch":
            return 409, _error_body(request, ApiError(
                409, "idempotency_mismatch", "this Idempotency-Key was used with another "
                "request"))
        if begun.outcome == "in_progress":
            return 409, _error_body(request, ApiError(
                409, "idempotency_in_progress", "a request with this Idempotency-Key is "
                "still running"))
        status, body, _ = await self._run(op, call)
        await call.store.idempotency_finish(call.key.id, idempotency_key, status, body)
        return status, body

    # --- the document ------------------------------------------------------------------------
    def openapi(self) -> dict[str, Any]:
        models: set[type[BaseModel]] = {ErrorResponse}
        for op in self.operations:
            models.update(m for m in (op.body, op.response) if m is not None)
        refs, schemas = models_json_schema(
            [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
            ref_template="#/components/schemas/{model}")
        paths: dict[str, dict[str, Any]] = {}
        for op in self.operations:
            paths.setdefault(op.path, {})[op.method.lower()] = self._describe(op)
            if op.method == "POST" and op.status == 201:
                self._link_created(op, paths[op.path]["post"])
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version},
            "paths": paths,
            "components": {
                "schemas": schemas.get("$defs", {}),
                "securitySchemes": {"bearer": {
                    "type": "http", "scheme": "bearer",
                    "description": f"an API key: {apikeys.SECRET_PREFIX}..."}},
            },
        }

    def _link_created(self, op: Operation, doc: dict[str, Any]) -> None:
        """OpenAPI links from a create to the operations on what it made (POST /v1/inboxes ->
        GET /v1/inboxes/{inbox}, ...): they tell clients and test generators how ids flow."""
        links = {}
        for other in self.operations:
            found = re.fullmatch(re.escape(op.path) + r"/\{(\w+)\}(/.*)?", other.path)
            if found:
                links[other.operation_id] = {
                    "operationId": other.operation_id,
                    "parameters": {found.group(1): "$response.body#/id"}}
        if links:
            doc["responses"]["201"]["links"] = links

    def _describe(self, op: Operation) -> dict[str, Any]:
        def ref(model: type[BaseModel]) -> dict[str, Any]:
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        error = {"content": {"application/json": {"schema": ref(ErrorResponse)}}}
        ok: dict[str, Any] = {"description": op.summary}
        if op.response is not None:
            ok["content"] = {"application/json": {"schema": ref(op.response)}}
        elif op.media is not None:
            ok["content"] = {op.media: {"schema": {"type": "string"}}}
        doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary,
                               "tags": [op.tag], "responses": {str(op.status): ok}}
        parameters = [{"name": name, "in": "path", "required": True,
                       "schema": {"type": "string"}}
                      for name in re.findall(r"\{(\w+)\}", op.path)]
        if op.query is not None:
            schema = op.query.model_json_schema()
            for name, prop in schema.get("properties", {}).items():
                parameters.append({"name": name, "in": "query",
                                   "required": name in schema.get("required", []),
                                   "schema": prop})
        if op.idempotent:
            parameters.append({"name": "Idempotency-Key", "in": "header", "required": False,
                               "schema": {"type": "string", "maxLength": 255},
                               "description": "a repeat within 24 h gets the first answer"})
        if parameters:
            doc["parameters"] = parameters
        if op.body is not None:
            doc["requestBody"] = {"required": True,
                                  "content": {"application/json": {"schema": ref(op.body)}}}
        if op.scope is not None:
            doc["security"] = [{"bearer": []}]
            for status, text in _ERRORS.items():
                if status in ("413", "415") and op.body is None:
                    continue
                doc["responses"][status] = {"description": text, **error}
        for status, text in op.errors.items():
            doc["responses"][str(status)] = {"description": text, **error}
        if op.idempotent:
            earlier = doc["responses"].get("409", {}).get("description")
            doc["responses"]["409"] = {"description": (f"{earlier}; or " if earlier else "") +
                                       "the Idempotency-Key was used with another request "
                                       "(idempotency_mismatch) or its first request still runs "
                                       "(idempotency_in_progress)", **error}
        doc["responses"].setdefault("500", {"description": "server failure", **error})
        return doc


async def authenticate(request: Any, store: AsyncStore, scope: str) -> ApiKey:
    header = request.getHeader("authorization") or ""
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "unauthorized", "send an API key: Authorization: Bearer ms_...")
    key = await store.api_key_for_secret(secret.strip())
    if key is None:
        raise ApiError(401, "unauthorized", "unknown, revoked or expired API key")
    if scope != ANY_KEY and not apikeys.grants(key.scopes, scope):
        raise ApiError(403, "forbidden", f"this key lacks the scope {scope}")
    return key


def _limit(request: Any, limiter: RateLimiter, key_id: str) -> None:
    verdict = limiter.take(key_id)
    request.setHeader("RateLimit-Limit", str(verdict.limit))
    request.setHeader("RateLimit-Remaining", str(verdict.remaining))
    request.setHeader("RateLimit-Reset", str(verdict.reset))
    if not verdict.allowed:
        request.setHeader("Retry-After", str(verdict.retry_after))
        raise ApiError(429, "rate_limited", f"over {verdict.limit} requests a minute for this "
                       f"key; retry in {verdict.retry_after} s")


def new_request_id() -> str:
    return new_id("req")


def request_id(request: Any) -> str:
    """The request's id, made on first use and sent back as X-Request-Id."""
    existing = getattr(request, "mailsuite_request_id", None)
    if existing is None:
        existing = new_request_id()
        request.mailsuite_request_id = existing
        request.setHeader("X-Request-Id", existing)
    return existing


def _error_body(request: Any, refusal: ApiError) -> bytes:
    error: dict[str, Any] = {"code": refusal.code, "message": refusal.message,
                             "request_id": request_id(request)}
    if refusal.param is not None:
        error["param"] = refusal.param
    return json.dumps({"error": error}, separators=(",", ":")).encode("utf-8")


def _unmatched(request: Any, refusal: ApiError) -> bytes:
    """A path or method no operation takes; counted under one route, not the raw path."""
    metrics.HTTP_REQUESTS.labels("unmatched", "-", str(refusal.status)).inc()
    return _error(request, refusal)


def _error(request: Any, refusal: ApiError) -> bytes:
    request.setResponseCode(refusal.status)
    request.setHeader("Content-Type", "application/json")
    return _error_body(request, refusal)


def _json_body(request: Any) -> Any:
    content_type = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    request.content.seek(0)
    try:
        return json.loads(request.content.read())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from None


def _query_args(request: Any) -> dict[str, str]:
    args: dict[str, str] = {}
    for name, values in request.args.items():
        try:
            args[name.decode("utf-8")] = values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_request", "query parameters must be UTF-8") from None
    return args


def _validate(model: type[BaseModel], data: Any, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"] if param is None else f"{param}: {first['msg']}"
        code = "unknown_field" if first["type"] == "extra_forbidden" else "invalid_" + where
        raise ApiError(400, code, message, param) from None
