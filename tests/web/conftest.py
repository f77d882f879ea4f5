"""A mailsuite with its HTTP API, one per backend, and an admin key made with the CLI's store."""

from __future__ import annotations

import pytest

from tests.harness import Mailsuite
from tests.web.client import ApiClient


@pytest.fixture
def api(mailsuite: Mailsuite) -> ApiClient:
    """A client holding a fresh unrestricted admin key."""
    _, secret = mailsuite.store.api_key_add("test admin", ["admin"])
    return ApiClient(mailsuite.http, secret)
