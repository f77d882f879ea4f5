"""A fresh store per test, on each backend."""

from __future__ import annotations

import secrets
import threading
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


def run_together(worker: Callable[[int], None], count: int) -> None:
    """worker(0) ... worker(count - 1) in threads at once; fails if one raised or hung."""
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            worker(n)
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


def new_domain(store: Store) -> str:
    domain = f"d{secrets.token_hex(4)}.test"
    store.domain_add(domain)
    return domain
