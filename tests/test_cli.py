"""The `mailsuite` admin command, run as a real subprocess against a real store."""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailsuite.passwords import check_password, hash_password
from mailsuite.store import Delivery, Store, open_store
from tests.harness import Mailsuite, free_port, write_config

MAILSUITE = str(Path(sys.executable).parent / "mailsuite")
BCRYPT_ROUNDS = 4
BCRYPT_HASH = re.compile(rf"^\$2[aby]\${BCRYPT_ROUNDS:02d}\$[./A-Za-z0-9]{{53}}$")


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def clean_env() -> dict[str, str]:
    """The process environment without MAILSUITE_* overrides, so only the config file counts."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILSUITE_")}


def run_cli(config: Path, *args: str, stdin: str | None = None) -> Result:
    argv = [MAILSUITE, "--config", str(config), *args]
    completed = subprocess.run(
        argv, input=stdin.encode() if stdin is not None else None,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True, timeout=60, env=clean_env())
    return Result(argv, completed.returncode, completed.stdout.decode("utf-8", "replace"),
                  completed.stderr.decode("utf-8", "replace"))


def ok(result: Result) -> str:
    assert result.returncode == 0, result
    assert result.stderr == "", result
    return result.stdout


def fails(result: Result) -> str:
    """A clean failure: non-zero exit, one line on stderr, no traceback. Returns that line."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("mailsuite: "), lines[0]
    return lines[0]


class CLI:
    """`mailsuite --config <file>` on a fresh database, plus the same store in this process."""

    def __init__(self, workdir: Path, db_url: str) -> None:
        self.db_url = db_url
        self.config = workdir / "mailsuite.toml"
        write_config(self.config, {
            "server": {"hostname": "mx.cli.test", "data_dir": str(workdir / "var")},
            "database": {"url": db_url, "pool_size": 1},
            "auth": {"bcrypt_rounds": BCRYPT_ROUNDS},
        })
        self._store: Store | None = None

    def __call__(self, *args: str, stdin: str | None = None) -> Result:
        return run_cli(self.config, *args, stdin=stdin)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.db_url, pool_size=2)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def snapshot(self) -> tuple:
        store = self.store
        return store.domain_list(), store.account_list(), store.alias_list()

    def add_domain(self, name: str) -> None:
        """Setup through the store, sparing a subprocess where the CLI is not under test."""
        self.store.domain_add(name)

    def add_user(self, address: str, password: str = "s3cret pass") -> None:
        self.store.account_add(address, hash_password(password, rounds=BCRYPT_ROUNDS))

    def deliver(self, address: str, raw: bytes) -> None:
        account = self.store.account_get(address)
        assert account is not None
        self.store.deliver(Delivery(raw, (account.id,)))


@pytest.fixture
def cli(backend: str, new_db_url: Callable[[str], str], tmp_path: Path) -> Iterator[CLI]:
    handle = CLI(tmp_path, new_db_url(backend))
    yield handle
    handle.close()


# --- domains -----------------------------------------------------------------------------

def test_domain_add_list_and_remove(cli: CLI) -> None:
    assert ok(cli("domain", "add", "Example-One.TEST")).startswith(
        "added domain example-one.test; DKIM selector(s): ms")
    cli.add_domain("two.test")
    assert ok(cli("domain", "list")) == ("example-one.test\t0 account(s)\n"
                                         "two.test\t0 account(s)\n")
    assert ok(cli("domain", "remove", "EXAMPLE-one.test")) == "removed domain example-one.test\n"
    assert ok(cli("domain", "list")) == "two.test\t0 account(s)\n"
    assert cli.store.is_local_domain("two.test")
    assert not cli.store.is_local_domain("example-one.test")


def test_domain_remove_refuses_while_accounts_exist_unless_forced(cli: CLI) -> None:
    cli.add_domain("busy.test")
    cli.add_domain("other.test")
    cli.add_user("a@busy.test")
    cli.add_user("b@busy.test")
    cli.add_user("c@other.test")
    blobs_empty = cli.store.blob_count()
    cli.deliver("a@busy.test", b"Subject: one\r\n\r\nfor a\r\n")
    cli.deliver("b@busy.test", b"Subject: two\r\n\r\nfor b\r\n")
    cli.deliver("c@other.test", b"Subject: three\r\n\r\nfor c\r\n")

    refused = cli("domain", "remove", "busy.test")
    assert refused.returncode == 1
    line = fails(refused)
    assert "busy.test" in line and "2 account" in line and "--force" in line
    assert refused.stdout == ""
    assert cli.store.account_list("busy.test") == ["a@busy.test", "b@busy.test"]
    assert len(cli.store.messages("a@busy.test")) == 1

    assert ok(cli("domain", "remove", "busy.test", "--force")) == "removed domain busy.test\n"
    assert not cli.store.is_local_domain("busy.test")
    assert cli.store.account_list() == ["c@other.test"]
    assert cli.store.account_get("a@busy.test") is None
    assert cli.store.messages("a@busy.test") == []
    assert cli.store.messages("b@busy.test") == []
    assert cli.store.blob_count() == blobs_empty + 1  # only c's message is left
    assert [m.raw for m in cli.store.messages("c@other.test")] == [
        b"Subject: three\r\n\r\nfor c\r\n"]
    assert ok(cli("domain", "list")) == "other.test\t1 account(s)\n"


def test_domain_remove_of_an_unknown_domain_fails_cleanly(cli: CLI) -> None:
    line = fails(cli("domain", "remove", "never.test"))
    assert "never.test" in line


# --- users -------------------------------------------------------------------------------

def test_user_add_reads_the_password_from_stdin_and_stores_a_bcrypt_hash(cli: CLI) -> None:
    cli.add_domain("pw.test")
    password = "Tr0ub4dor & 3 ünïcode"
    result = cli("user", "add", "Alice@PW.test", "--password-stdin", stdin=password + "\n")
    assert ok(result) == "added user alice@pw.test\n"
    assert not any(password in arg for arg in result.args)
    assert password not in result.stdout + result.stderr

    account = cli.store.account_get("alice@pw.test")
    assert account is not None and account.address == "alice@pw.test"
    assert BCRYPT_HASH.match(account.password_hash), account.password_hash
    assert check_password(password, account.password_hash)
    assert not check_password(password + "x", account.password_hash)
    assert not check_password(password[:-1], account.password_hash)


def test_user_add_without_a_terminal_and_without_password_stdin_fails_cleanly(cli: CLI) -> None:
    cli.add_domain("tty.test")
    line = fails(cli("user", "add", "bob@tty.test"))  # stdin is /dev/null: no terminal
    assert "--password-stdin" in line
    assert cli.store.account_get("bob@tty.test") is None


def test_user_add_with_an_empty_password_on_stdin_is_refused(cli: CLI) -> None:
    cli.add_domain("empty.test")
    line = fails(cli("user", "add", "bob@empty.test", "--password-stdin", stdin="\n"))
    assert "password" in line
    assert cli.store.account_get("bob@empty.test") is None


def test_user_list_lists_all_accounts_or_those_of_one_domain(cli: CLI) -> None:
    cli.add_domain("one.test")
    cli.add_domain("two.test")
    cli.add_user("zed@one.test")
    cli.add_user("amy@one.test")
    cli.add_user("amy@two.test")
    assert ok(cli("user", "list")) == "amy@one.test\namy@two.test\nzed@one.test\n"
    assert ok(cli("user", "list", "one.test")) == "amy@one.test\nzed@one.test\n"
    assert "three.test" in fails(cli("user", "list", "three.test"))


def test_user_passwd_changes_the_password(cli: CLI) -> None:
    cli.add_domain("passwd.test")
    cli.add_user("carol@passwd.test", "old password")
    before = cli.store.account_get("carol@passwd.test")
    assert before is not None
    result = cli("user", "passwd", "Carol@passwd.test", "--password-stdin",
                 stdin="new password\n")
    assert ok(result) == "changed password of carol@passwd.test\n"
    after = cli.store.account_get("carol@passwd.test")
    assert after is not None and after.id == before.id
    assert BCRYPT_HASH.match(after.password_hash)
    assert check_password("new password", after.password_hash)
    assert not check_password("old password", after.password_hash)
    line = fails(cli("user", "passwd", "nobody@passwd.test", "--password-stdin", stdin="x\n"))
    assert "nobody@passwd.test" in line


def test_user_remove_removes_the_account_and_its_mail(cli: CLI) -> None:
    cli.add_domain("rm.test")
    cli.add_user("dave@rm.test")
    cli.add_user("erin@rm.test")
    blobs_before = cli.store.blob_count()
    cli.deliver("dave@rm.test", b"Subject: bye\r\n\r\ndave's\r\n")
    cli.deliver("erin@rm.test", b"Subject: hi\r\n\r\nerin's\r\n")
    assert ok(cli("user", "remove", "DAVE@rm.test")) == "removed user dave@rm.test\n"
    assert cli.store.account_list() == ["erin@rm.test"]
    assert cli.store.account_get("dave@rm.test") is None
    assert cli.store.messages("dave@rm.test") == []
    assert cli.store.blob_count() == blobs_before + 1
    assert len(cli.store.messages("erin@rm.test")) == 1
    assert "dave@rm.test" in fails(cli("user", "remove", "dave@rm.test"))


# --- aliases -----------------------------------------------------------------------------

def test_alias_add_list_and_remove_including_a_catch_all(cli: CLI) -> None:
    cli.add_domain("alias.test")
    cli.add_user("ann@alias.test")
    cli.add_user("ben@alias.test")
    ann = cli.store.account_get("ann@alias.test")
    ben = cli.store.account_get("ben@alias.test")
    assert ann is not None and ben is not None

    assert ok(cli("alias", "add", "Team@alias.test", "ann@alias.test", "BEN@alias.test")) == (
        "added alias team@alias.test -> ann@alias.test, ben@alias.test\n")
    assert ok(cli("alias", "add", "@alias.test", "ann@alias.test")) == (
        "added alias @alias.test -> ann@alias.test\n")
    assert ok(cli("alias", "list")) == ("@alias.test\tann@alias.test\n"
                                        "team@alias.test\tann@alias.test, ben@alias.test\n")
    team = cli.store.resolve("team@alias.test")
    assert team.kind == "local" and sorted(team.account_ids) == sorted([ann.id, ben.id])
    catch_all = cli.store.resolve("whoever@alias.test")
    assert catch_all.kind == "local" and catch_all.account_ids == (ann.id,)

    assert ok(cli("alias", "remove", "@alias.test")) == "removed alias @alias.test\n"
    assert cli.store.resolve("whoever@alias.test").kind == "unknown"
    assert ok(cli("alias", "list")) == "team@alias.test\tann@alias.test, ben@alias.test\n"
    assert "@alias.test" in fails(cli("alias", "remove", "@alias.test"))


# --- errors: one line on stderr, a non-zero exit, nothing changed ------------------------

ERROR_CASES = {
    "unknown domain for a user": (
        ["user", "add", "u@nowhere.test", "--password-stdin"], "pw\n", "nowhere.test"),
    "duplicate account": (
        ["user", "add", "Taken@known.test", "--password-stdin"], "pw\n", "taken@known.test"),
    "duplicate domain": (["domain", "add", "KNOWN.test"], None, "known.test"),
    "invalid address": (["user", "add", "no-at-sign", "--password-stdin"], "pw\n", None),
    "invalid alias destination": (
        ["alias", "add", "x@known.test", "not an address"], None, None),
    "invalid domain": (["domain", "add", "bad_domain!.test"], None, "bad_domain!.test"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_every_error_is_one_line_on_stderr_with_a_nonzero_exit(cli: CLI, case: str) -> None:
    cli.store.domain_add("known.test")
    cli.store.account_add("taken@known.test", "$2b$04$" + "x" * 53)
    before = cli.snapshot()
    args, stdin, named = ERROR_CASES[case]
    result = cli(*args, stdin=stdin)
    line = fails(result)
    assert result.stdout == ""
    if named is not None:
        assert named in line, line
    assert cli.snapshot() == before


def test_malformed_config_file_is_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('[server]\nhostname = "mx.test"\ndata_dir = \n', encoding="utf-8")
    line = fails(run_cli(config, "domain", "list"))
    assert str(config) in line
    assert re.search(r"\bline 3\b", line), line


def test_unknown_option_in_config_file_names_the_file_line_and_option(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text('[database]\nurl = "sqlite:///x.db"\npool_szie = 2\n', encoding="utf-8")
    line = fails(run_cli(config, "domain", "list"))
    assert f"{config}:3:" in line and "database.pool_szie" in line
    assert not (tmp_path / "x.db").exists()


def test_missing_config_file_fails_cleanly_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "absent.toml"
    assert str(config) in fails(run_cli(config, "domain", "list"))


def test_unreachable_postgresql_url_fails_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "pg.toml"
    port = free_port()  # nothing listens there
    write_config(config, {"database": {"url": f"postgresql://postgres@127.0.0.1:{port}/none"}})
    line = fails(run_cli(config, "domain", "list"))
    assert f"{port}" in line or "connect" in line.lower(), line


# --- alongside a running server ----------------------------------------------------------

def test_cli_works_while_a_server_runs_on_the_same_store(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite()
    assert ok(run_cli(server.config_path, "domain", "add", "live.test")).startswith(
        "added domain live.test;")
    ok(run_cli(server.config_path, "user", "add", "frank@live.test", "--password-stdin",
               stdin="live password\n"))
    assert ok(run_cli(server.config_path, "user", "list")) == "frank@live.test\n"
    with smtplib.SMTP(*server.mx, timeout=30) as smtp:
        refused = smtp.sendmail("someone@spf-pass.test", ["frank@live.test"],
                                b"Subject: hello while running\r\n\r\nadded by the CLI\r\n")
    assert refused == {}
    inbox = server.inbox("frank@live.test")
    assert len(inbox) == 1 and b"added by the CLI" in inbox[0]
    assert server.process is not None and server.process.poll() is None
