"""A fresh store per test, on each backend."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest

from mailsuite.store import Store, open_store


@pytest.fixture
def db_url(backend: str, new_db_url: Callable[[str], str]) -> str:
    return new_db_url(backend)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    opened = open_store(db_url, pool_size=8)
    yield opened
    opened.close()


def new_domain(store: Store) -> str:
    domain = f"d{secrets.token_hex(4)}.test"
    store.domain_add(domain)
    return domain
