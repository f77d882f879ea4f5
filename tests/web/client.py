"""A small HTTP client for the API tests (the stdlib's http.client over a real socket) that
holds every response to the server's own OpenAPI document."""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str:
        return self.json["error"]["code"]


class ApiClient:
    def __init__(self, address: tuple[str, int], key: str | None = None) -> None:
        self.address = address
        self.key = key
        self._document: dict[str, Any] | None = None

    def with_key(self, key: str | None) -> ApiClient:
        other = ApiClient(self.address, key)
        other._document = self._document
        return other

    def request(self, method: str, path: str, body: Any = None, *,
                raw: bytes | None = None, headers: dict[str, str] | None = None,
                check: bool = True) -> Response:
        sent = dict(headers or {})
        if self.key is not None:
            sent.setdefault("Authorization", f"Bearer {self.key}")
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(*self.address, timeout=30)
        try:
            conn.request(method, path, body=data, headers=sent)
            reply = conn.getresponse()
            response = Response(reply.status, reply.headers, reply.read())
        finally:
            conn.close()
        assert re.fullmatch(r"req_[0-9a-z]{26}", response.headers.get("X-Request-Id", "")), \
            response.headers
        if response.status >= 400:
            assert response.headers.get("Content-Type") == "application/json"
            # A replayed answer keeps the request id of the request that made it.
            if response.headers.get("Idempotent-Replayed") != "true":
                assert response.json["error"]["request_id"] == response.headers["X-Request-Id"]
        if check:
            self.conforms(method, path, response)
        return response

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.request("DELETE", path, **kw)

    # --- the document -------------------------------------------------------------------------
    @property
    def document(self) -> dict[str, Any]:
        if self._document is None:
            reply = self.with_key(None).request("GET", "/v1/openapi.json", check=False)
            assert reply.status == 200
            self._document = reply.json
        return self._document

    def conforms(self, method: str, path: str, response: Response) -> None:
        """The response's status is documented for its operation and its body fits the schema."""
        operation = self._operation(method, path.split("?")[0])
        assert operation is not None, f"{method} {path} is not in the document"
        documented = operation["responses"].get(str(response.status))
        assert documented is not None, f"{method} {path}: {response.status} is not documented"
        schema = documented.get("content", {}).get("application/json", {}).get("schema")
        if schema is None:
            return
        registry = Registry().with_resource(
            "urn:doc", Resource(contents=self.document, specification=DRAFT202012))
        ref = schema["$ref"].replace("#/", "urn:doc#/")
        jsonschema.Draft202012Validator({"$ref": ref}, registry=registry).validate(response.json)

    def _operation(self, method: str, path: str) -> dict[str, Any] | None:
        for template, operations in self.document["paths"].items():
            pattern = "^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)) + "$"
            if re.match(pattern, path) and method.lower() in operations:
                return operations[method.lower()]
        return None
