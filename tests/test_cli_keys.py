"""`mailsuite key create|list|revoke`, run as a real subprocess on both stores."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_cli import CLI, fails, ok


@pytest.fixture
def cli(backend: str, new_db_url: Callable[[str], str], tmp_path: Path) -> Iterator[CLI]:
    handle = CLI(tmp_path, new_db_url(backend))
    yield handle
    handle.close()


def test_key_create_prints_the_secret_once_and_list_never_shows_it(cli: CLI) -> None:
    cli.add_domain("keys.test")
    cli.add_user("bot@keys.test")
    out = ok(cli("key", "create", "--name", "support bot", "--scope", "messages:read",
                 "--scope", "messages:send", "--inbox", "BOT@keys.test",
                 "--expires", "2031-05-01"))
    match = re.fullmatch(r"created key (key_[0-9a-z]{26}) \(messages:read messages:send\)\n"
                         r"secret \(shown only now\): (ms_[A-Za-z0-9_-]{43})\n", out)
    assert match, out
    key_id, secret = match.groups()
    assert cli.store.api_key_for_secret(secret).id == key_id

    listed = ok(cli("key", "list"))
    assert secret not in listed
    assert listed == (f"{key_id}\t{secret[:9]}…\tsupport bot\tmessages:read messages:send\t"
                      "bot@keys.test\texpires 2031-05-01 00:00\n")

    assert ok(cli("key", "revoke", key_id)) == f"revoked key {key_id} (support bot)\n"
    assert cli.store.api_key_for_secret(secret) is None
    assert "\trevoked " in ok(cli("key", "list"))
    assert fails(cli("key", "revoke", key_id)) == f"mailsuite: no active key {key_id}"


def test_key_create_refuses_what_it_cannot_honour(cli: CLI) -> None:
    assert fails(cli("key", "create", "--name", "x", "--scope", "root")).startswith(
        "mailsuite: unknown scope 'root'")
    assert fails(cli("key", "create", "--name", "x", "--scope", "admin", "--domain",
                     "absent.test")) == "mailsuite: unknown domain absent.test"
    assert fails(cli("key", "create", "--name", "x", "--scope", "admin", "--expires",
                     "2001-01-01")) == "mailsuite: --expires is in the past"
    assert fails(cli("key", "create", "--name", "x", "--scope", "admin", "--expires",
                     "soon")).startswith("mailsuite: not a date or time: 'soon'")
    assert ok(cli("key", "list")) == ""
