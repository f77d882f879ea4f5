"""Schemathesis hooks for tests/web/test_schemathesis.py: API keys minted in the store.

The run may revoke or rotate the key it uses (it finds the key's id through /v1/me); a 401
then mints a new admin key and the request is retried, so every operation stays reachable.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

from mailsuite.store import open_store


@schemathesis.auth(retry_on=[401])
class MintedKey:
    def __init__(self) -> None:
        self.store = open_store(os.environ["MAILSUITE_ST_DB_URL"], pool_size=1, migrate=False)

    def get(self, case: Any, ctx: Any) -> str:
        return self.store.api_key_add("schemathesis", ["admin"])[1]

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"
