"""The `mailsuite` admin command for sending: DKIM keys and the DNS records to publish, send
grants, the outbound queue and suppressions; run as a real subprocess on a SQLite store."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailsuite import dkim
from mailsuite.store import Outbound, Outcome, Store, Submission, new_queue_id, open_store
from tests.harness import write_config
from tests.test_cli import Result, fails, ok, run_cli

HOSTNAME = "mx.cli.test"
HASH = "$2b$04$" + "x" * 53
SELECTOR = re.compile(r"ms\d{6}[0-9a-f]{4}[re]")
MESSAGE = (b"From: Alice <alice@out.test>\r\nTo: bob@remote.test\r\nSubject: queued one\r\n"
           b"Message-ID: <queued-1@out.test>\r\n\r\nthe body, not shown by default\r\n")


class CLI:
    """`mailsuite --config <file>` on a fresh SQLite database, and the same store here."""

    def __init__(self, workdir: Path, db_url: str, dkim_options: dict[str, Any]) -> None:
        self.config = workdir / "mailsuite.toml"
        sections: dict[str, dict[str, Any]] = {
            "server": {"hostname": HOSTNAME, "data_dir": str(workdir / "var")},
            "database": {"url": db_url, "pool_size": 1},
            "auth": {"bcrypt_rounds": 4},
        }
        if dkim_options:
            sections["dkim"] = dkim_options
        write_config(self.config, sections)
        self.store: Store = open_store(db_url, pool_size=2)

    def __call__(self, *args: str) -> Result:
        return run_cli(self.config, *args)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def make_cli(new_db_url: Callable[[str], str], tmp_path: Path) -> Iterator[Callable[..., CLI]]:
    made: list[CLI] = []

    def make(**dkim_options: Any) -> CLI:
        workdir = tmp_path / f"cli-{len(made)}"
        workdir.mkdir()
        made.append(CLI(workdir, new_db_url("sqlite"), dkim_options))
        return made[-1]

    yield make
    for cli in made:
        cli.close()


@pytest.fixture
def cli(make_cli: Callable[..., CLI]) -> CLI:
    return make_cli()


def zone(text: str) -> list[tuple[str, str, str]]:
    """`domain dns` output as (name, type, value) with TXT strings joined."""
    records = []
    for line in text.splitlines():
        name, klass, rtype, value = line.split("\t")
        assert klass == "IN", line
        if rtype == "TXT":
            chunks = re.findall(r'"([^"]*)"', value)
            assert " ".join(f'"{c}"' for c in chunks) == value, value
            assert all(len(chunk) <= 255 for chunk in chunks), value
            value = "".join(chunks)
        records.append((name, rtype, value))
    return records


def stored_key(store: Store, domain: str, algorithm: str = dkim.RSA_SHA256) -> dkim.DKIMKey:
    [found] = [k for k in store.dkim_keys(domain) if k.algorithm == algorithm]
    return dkim.DKIMKey(found.domain, found.selector, found.algorithm, found.private_key)


def queue_message(store: Store, recipients: tuple[str, ...], raw: bytes = MESSAGE,
                  sender: str = "alice@out.test") -> str:
    queue_id = new_queue_id()
    assert store.submit_many([Submission(queue_id, None, Outbound(
        sender=sender, recipients=recipients, raw=raw))]) == [queue_id]
    return queue_id


def defer_all(store: Store, reply: str = "451 4.2.0 try again later",
              delay: timedelta = timedelta(hours=1)) -> datetime:
    now = datetime.now(UTC) + timedelta(seconds=1)
    for job in store.queue_claim("test", now, 1000, 60):
        store.queue_record(job, [Outcome(r, "deferred", reply, "mx.remote.test", now + delay)
                                 for r in job.recipients], now)
    return now + delay


def suppress(store: Store, address: str, reason: str) -> None:
    queue_message(store, (address,))
    now = datetime.now(UTC) + timedelta(seconds=1)
    for job in store.queue_claim("test", now, 1000, 60):
        store.queue_record(job, [Outcome(r, "bounced", reason, "mx", suppress=True)
                                 for r in job.recipients], now)


# --- domains and their DKIM keys ---------------------------------------------------------

def test_domain_add_makes_an_active_rsa_key_and_prints_its_selector(cli: CLI) -> None:
    out = ok(cli("domain", "add", "Out.TEST"))
    match = re.fullmatch(r"added domain out\.test; DKIM selector\(s\): (\S+)\n"
                         r"publish the records printed by: mailsuite domain dns out\.test\n", out)
    assert match, out
    selector = match[1]
    assert SELECTOR.fullmatch(selector) and selector.endswith("r"), selector
    [stored] = cli.store.dkim_keys("out.test", active_only=False)
    assert (stored.selector, stored.algorithm, stored.active) == (selector, dkim.RSA_SHA256,
                                                                  True)
    private = serialization.load_pem_private_key(stored.private_key, password=None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 2048
    assert ok(cli("dkim", "list", "out.test")) == f"{selector}\trsa-sha256\tactive\n"


def test_domain_dns_prints_mx_spf_dkim_and_dmarc_records(cli: CLI) -> None:
    ok(cli("domain", "add", "out.test"))
    key = stored_key(cli.store, "out.test")
    records = zone(ok(cli("domain", "dns", "OUT.test")))
    assert records == [
        ("out.test.", "MX", f"10 {HOSTNAME}."),
        ("out.test.", "TXT", f"v=spf1 mx a:{HOSTNAME} ~all"),
        (f"{key.selector}._domainkey.out.test.", "TXT", dkim.public_record(key)),
        ("_dmarc.out.test.", "TXT", "v=DMARC1; p=quarantine; rua=mailto:postmaster@out.test"),
    ]
    assert dkim.public_record(key).startswith("v=DKIM1; k=rsa; p=")


def test_domain_dns_of_a_domain_without_a_key_says_how_to_make_one(cli: CLI) -> None:
    cli.store.domain_add("bare.test")  # as before DKIM: no key
    result = cli("domain", "dns", "bare.test")
    assert result.returncode == 0, result
    assert "dkim rotate bare.test" in result.stderr
    assert [rtype for _, rtype, _ in zone(result.stdout)] == ["MX", "TXT", "TXT"]
    assert "_domainkey" not in result.stdout


def test_domain_dns_and_dkim_rotate_of_an_unknown_domain_fail_cleanly(cli: CLI) -> None:
    for command in ("domain dns", "dkim rotate"):
        result = cli(*command.split(), "never.test")
        assert result.returncode == 1
        assert "never.test" in fails(result)
        assert result.stdout == ""


def test_dkim_list_of_an_unknown_domain_fails_cleanly(cli: CLI) -> None:
    # Like `domain dns` and `dkim rotate`: a mistyped domain is an error, not "no keys".
    result = cli("dkim", "list", "never.test")
    assert result.returncode == 1
    assert "never.test" in fails(result)


def test_dkim_rotate_adds_a_selector_that_signs_from_now_on_and_retires_the_old_one(
        cli: CLI) -> None:
    ok(cli("domain", "add", "out.test"))
    old = stored_key(cli.store, "out.test").selector

    out = ok(cli("dkim", "rotate", "Out.Test"))
    match = re.match(r"out\.test: new rsa-sha256 selector (\S+)\n", out)
    assert match, out
    new = match[1]
    assert SELECTOR.fullmatch(new) and new != old
    assert "keep the old record published" in out
    assert stored_key(cli.store, "out.test").selector == new
    assert ok(cli("dkim", "list", "out.test")) == (f"{new}\trsa-sha256\tactive\n"
                                                   f"{old}\trsa-sha256\tretired\n")
    records = zone(ok(cli("domain", "dns", "out.test")))
    dkim_records = {name: value for name, rtype, value in records if "_domainkey" in name}
    assert dkim_records[f"{new}._domainkey.out.test."] == dkim.public_record(
        stored_key(cli.store, "out.test"))

    newest = re.match(r"out\.test: new rsa-sha256 selector (\S+)\n",
                      ok(cli("dkim", "rotate", "out.test")))
    assert newest
    assert ok(cli("dkim", "list", "out.test")) == (f"{newest[1]}\trsa-sha256\tactive\n"
                                                   f"{new}\trsa-sha256\tretired\n"
                                                   f"{old}\trsa-sha256\tretired\n")


def test_with_ed25519_enabled_domain_add_and_rotate_make_both_keys(
        make_cli: Callable[..., CLI]) -> None:
    cli = make_cli(ed25519=True, rsa_bits=1024)
    out = ok(cli("domain", "add", "both.test"))
    match = re.match(r"added domain both\.test; DKIM selector\(s\): (\S+), (\S+)\n", out)
    assert match, out
    rsa_selector, ed_selector = match[1], match[2]
    assert rsa_selector.endswith("r") and ed_selector.endswith("e")
    assert ok(cli("dkim", "list", "both.test")) == (f"{rsa_selector}\trsa-sha256\tactive\n"
                                                    f"{ed_selector}\ted25519-sha256\tactive\n")
    rsa_key = stored_key(cli.store, "both.test")
    ed_key = stored_key(cli.store, "both.test", dkim.ED25519_SHA256)
    private = serialization.load_pem_private_key(ed_key.private_key, password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    records = zone(ok(cli("domain", "dns", "both.test")))
    assert (f"{rsa_selector}._domainkey.both.test.", "TXT",
            dkim.public_record(rsa_key)) in records
    assert (f"{ed_selector}._domainkey.both.test.", "TXT",
            dkim.public_record(ed_key)) in records
    assert dkim.public_record(ed_key).startswith("v=DKIM1; k=ed25519; p=")

    out = ok(cli("dkim", "rotate", "both.test"))
    new = dict(re.findall(r"both\.test: new (\S+) selector (\S+)\n", out))
    assert set(new) == {"rsa-sha256", "ed25519-sha256"}
    assert ok(cli("dkim", "list", "both.test")) == (
        f"{new['rsa-sha256']}\trsa-sha256\tactive\n"
        f"{new['ed25519-sha256']}\ted25519-sha256\tactive\n"
        f"{rsa_selector}\trsa-sha256\tretired\n"
        f"{ed_selector}\ted25519-sha256\tretired\n")


# --- send grants -------------------------------------------------------------------------

def test_sender_grant_list_and_revoke(cli: CLI) -> None:
    cli.store.domain_add("out.test")
    cli.store.account_add("alice@out.test", HASH)
    assert ok(cli("sender", "list", "alice@out.test")) == ""
    assert ok(cli("sender", "grant", "Alice@out.test", "Other.TEST")) == (
        "alice@out.test may now send as any address of other.test\n")
    ok(cli("sender", "grant", "alice@out.test", "another.test"))
    assert ok(cli("sender", "list", "ALICE@out.test")) == "another.test\nother.test\n"
    account = cli.store.account_get("alice@out.test")
    assert account is not None
    assert cli.store.sender_identities(account.id).allows("anyone@other.test")

    again = cli("sender", "grant", "alice@out.test", "other.test")
    assert again.returncode == 1 and "other.test" in fails(again)

    assert ok(cli("sender", "revoke", "alice@out.test", "other.test")) == (
        "alice@out.test may no longer send for other.test\n")
    assert ok(cli("sender", "list", "alice@out.test")) == "another.test\n"
    assert not cli.store.sender_identities(account.id).allows("anyone@other.test")
    gone = cli("sender", "revoke", "alice@out.test", "other.test")
    assert gone.returncode == 1 and "other.test" in fails(gone)


@pytest.mark.parametrize("args", [
    ("sender", "grant", "nobody@out.test", "other.test"),
    ("sender", "revoke", "nobody@out.test", "other.test"),
    ("sender", "list", "nobody@out.test"),
])
def test_sender_commands_for_an_unknown_account_fail_cleanly(cli: CLI,
                                                           args: tuple[str, ...]) -> None:
    cli.store.domain_add("out.test")
    result = cli(*args)
    assert result.returncode == 1 and result.stdout == ""
    assert "nobody@out.test" in fails(result)


def test_sender_grant_of_an_invalid_domain_fails_cleanly(cli: CLI) -> None:
    cli.store.domain_add("out.test")
    cli.store.account_add("alice@out.test", HASH)
    assert "bad_domain!" in fails(cli("sender", "grant", "alice@out.test", "bad_domain!"))
    assert cli.store.grant_list("alice@out.test") == []


# --- the queue ---------------------------------------------------------------------------

def test_queue_list_shows_each_message_and_its_recipients(cli: CLI) -> None:
    assert ok(cli("queue", "list")) == "0 message(s), 0 recipient(s)\n"
    first = queue_message(cli.store, ("bob@remote.test", "carol@remote.test"))
    entry = cli.store.queue_list(first)[0]
    lines = ok(cli("queue", "list")).splitlines()
    assert lines[0].split() == [first, *f"{entry.created_at:%Y-%m-%d %H:%M:%S}".split(),
                                str(len(MESSAGE)), "submission", "<alice@out.test>"]
    assert [line.split()[:3] for line in lines[1:3]] == [
        ["<bob@remote.test>", "queued", "attempts=0"],
        ["<carol@remote.test>", "queued", "attempts=0"]]
    assert lines[1].startswith("    ")
    assert lines[3:] == ["1 message(s), 2 recipient(s)"]

    next_at = defer_all(cli.store)
    second = queue_message(cli.store, ("dave@else.test",), sender="")
    lines = ok(cli("queue", "list")).splitlines()
    assert f"attempts=1  next={next_at:%Y-%m-%d %H:%M:%S}  451 4.2.0 try again later" in lines[1]
    assert lines[1].split()[1] == "deferred"
    assert lines[3].split()[0] == second and lines[3].endswith("<>")
    assert "<dave@else.test>  queued  attempts=0" in lines[4]
    assert lines[-1] == "2 message(s), 3 recipient(s)"


def test_queue_show_prints_the_entry_and_the_headers_or_with_body_the_message(
        cli: CLI) -> None:
    queue_id = queue_message(cli.store, ("bob@remote.test",))
    out = ok(cli("queue", "show", queue_id.lower()))
    head, _, message = out.partition("\n\n")
    assert f"Queue-ID: {queue_id}" in head.splitlines()
    assert "Kind: submission" in head.splitlines()
    assert "Sender: <alice@out.test>" in head.splitlines()
    assert f"Size: {len(MESSAGE)}" in head.splitlines()
    assert any(line.startswith("Recipient: <bob@remote.test> state=queued attempts=0")
               for line in head.splitlines())
    assert message == ("From: Alice <alice@out.test>\nTo: bob@remote.test\n"
                       "Subject: queued one\nMessage-ID: <queued-1@out.test>\n")
    assert "the body" not in out
    with_body = ok(cli("queue", "show", queue_id, "--body"))
    assert with_body.partition("\n\n")[2] == MESSAGE.decode().replace("\r\n", "\n")


def test_queue_retry_makes_one_or_all_messages_due_now(cli: CLI) -> None:
    first = queue_message(cli.store, ("a@remote.test", "b@remote.test"))
    second = queue_message(cli.store, ("c@remote.test",))
    defer_all(cli.store)
    before = datetime.now(UTC)

    assert ok(cli("queue", "retry", first.lower())) == "2 recipient(s) due now\n"
    after = datetime.now(UTC)
    assert all(before - timedelta(seconds=1) <= next_at <= after
               for _, _, _, next_at, _ in cli.store.queue_list(first)[0].recipients)
    [(_, _, _, still_later, _)] = cli.store.queue_list(second)[0].recipients
    assert still_later > after + timedelta(minutes=30)

    assert ok(cli("queue", "retry", "--all")) == "3 recipient(s) due now\n"
    [(_, _, _, now_due, _)] = cli.store.queue_list(second)[0].recipients
    assert now_due <= datetime.now(UTC)
    assert "--all" in fails(cli("queue", "retry"))


def test_queue_delete_empties_the_queue_of_that_message(cli: CLI) -> None:
    gone = queue_message(cli.store, ("a@remote.test", "b@remote.test"))
    kept = queue_message(cli.store, ("c@remote.test",))
    assert ok(cli("queue", "delete", gone.lower())) == (
        f"deleted {gone} (2 recipient(s), no bounce sent)\n")
    assert [e.queue_id for e in cli.store.queue_list()] == [kept]
    assert cli.store.queue_message(gone) is None
    ok(cli("queue", "delete", kept))
    assert ok(cli("queue", "list")) == "0 message(s), 0 recipient(s)\n"


@pytest.mark.parametrize("action", [("show",), ("retry",), ("delete",), ("show", "--body")])
def test_queue_commands_on_an_unknown_id_fail_with_one_line(cli: CLI,
                                                          action: tuple[str, ...]) -> None:
    kept = queue_message(cli.store, ("a@remote.test",))
    unknown = secrets.token_hex(6).upper()
    result = cli("queue", action[0], unknown, *action[1:])
    assert result.returncode == 1
    assert result.stdout == ""
    assert unknown in fails(result)
    assert [e.queue_id for e in cli.store.queue_list()] == [kept]


# --- suppressions ------------------------------------------------------------------------

def test_suppression_list_and_clear_one_or_all(cli: CLI) -> None:
    assert ok(cli("suppression", "list")) == ""
    suppress(cli.store, "Gone@Remote.test", "550 5.1.1 user unknown")
    suppress(cli.store, "also@remote.test", "550 5.1.1 no mailbox")
    lines = ok(cli("suppression", "list")).splitlines()
    assert [line.split("\t")[0] for line in lines] == ["also@remote.test", "gone@remote.test"]
    assert [line.split("\t")[2] for line in lines] == ["550 5.1.1 no mailbox",
                                                       "550 5.1.1 user unknown"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line.split("\t")[1])
               for line in lines)

    assert ok(cli("suppression", "clear", "GONE@remote.test")) == "cleared 1 address(es)\n"
    assert cli.store.suppression_reason("gone@remote.test") is None
    not_there = cli("suppression", "clear", "gone@remote.test")
    assert not_there.returncode == 1 and "gone@remote.test" in fails(not_there)
    assert "--all" in fails(cli("suppression", "clear"))

    suppress(cli.store, "third@remote.test", "550 5.1.1 gone")
    assert ok(cli("suppression", "clear", "--all")) == "cleared 2 address(es)\n"
    assert ok(cli("suppression", "list")) == ""
    assert cli.store.suppression_list() == []
