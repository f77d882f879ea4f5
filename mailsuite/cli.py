"""The `mailsuite` admin command: acts on the same store as the server, running or not."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError

from mailsuite import dkim
from mailsuite.addresses import AddressError, parse_account_address, parse_domain
from mailsuite.config import ConfigError, load_config
from mailsuite.passwords import PasswordError, hash_password
from mailsuite.store import Store, StoreError, open_store

DEFAULT_CONFIG = os.environ.get("MAILSUITE_CONFIG", "conf/mailsuite.toml")


class CommandError(Exception):
    pass


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise CommandError("no terminal to prompt on; use --password-stdin")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("passwords do not match")
    if not password:
        raise CommandError("empty password")
    return password


def _local_domain(store: Store, name: str) -> str:
    name = parse_domain(name)
    if not store.is_local_domain(name):
        raise CommandError(f"unknown domain {name}")
    return name


def _new_keys(args: argparse.Namespace, domain: str) -> list[dkim.DKIMKey]:
    return dkim.new_domain_keys(domain, args.config.dkim.rsa_bits, args.config.dkim.ed25519)


def cmd_domain_add(store: Store, args: argparse.Namespace) -> None:
    name = parse_domain(args.name)
    keys = _new_keys(args, name)
    store.domain_add(name, [(k.selector, k.algorithm, k.private_key) for k in keys])
    print(f"added domain {name}; DKIM selector(s): {', '.join(k.selector for k in keys)}")
    print(f"publish the records printed by: mailsuite domain dns {name}")


def cmd_domain_dns(store: Store, args: argparse.Namespace) -> None:
    name = _local_domain(store, args.name)
    keys = [dkim.DKIMKey(k.domain, k.selector, k.algorithm, k.private_key)
            for k in store.dkim_keys(name)]
    if not keys:
        print(f"; {name} has no DKIM key yet: mailsuite dkim rotate {name}", file=sys.stderr)
    print(dkim.format_zone(dkim.dns_records(name, args.config.server.hostname, keys)), end="")


def cmd_dkim_rotate(store: Store, args: argparse.Namespace) -> None:
    name = _local_domain(store, args.name)
    for key in _new_keys(args, name):
        store.dkim_key_add(name, key.selector, key.algorithm, key.private_key)
        print(f"{name}: new {key.algorithm} selector {key.selector}")
    print("publish its record before mail signed with it leaves (servers cache DNS); "
          "keep the old record published for a few days")


def cmd_dkim_list(store: Store, args: argparse.Namespace) -> None:
    name = _local_domain(store, args.name)
    for key in store.dkim_keys(name, active_only=False):
        print(f"{key.selector}\t{key.algorithm}\t{'active' if key.active else 'retired'}")


def cmd_domain_list(store: Store, args: argparse.Namespace) -> None:
    for name, count in store.domain_list():
        print(f"{name}\t{count} account(s)")


def cmd_domain_remove(store: Store, args: argparse.Namespace) -> None:
    store.domain_remove(args.name, force=args.force)
    print(f"removed domain {args.name.lower()}")


def cmd_user_add(store: Store, args: argparse.Namespace) -> None:
    address = parse_account_address(args.address)  # before asking for a password
    if not store.is_local_domain(address.domain):
        raise CommandError(f"unknown domain {address.domain}")
    password = _read_password(args)
    store.account_add(args.address, hash_password(password, args.config.auth.bcrypt_rounds))
    print(f"added user {args.address.lower()}")


def cmd_user_list(store: Store, args: argparse.Namespace) -> None:
    for address in store.account_list(args.domain):
        print(address)


def cmd_user_passwd(store: Store, args: argparse.Namespace) -> None:
    if store.account_get(args.address) is None:  # before asking for a password
        raise CommandError(f"no account {args.address.lower()}")
    password = _read_password(args)
    store.account_set_password(args.address,
                               hash_password(password, args.config.auth.bcrypt_rounds))
    print(f"changed password of {args.address.lower()}")


def cmd_user_remove(store: Store, args: argparse.Namespace) -> None:
    store.account_remove(args.address)
    print(f"removed user {args.address.lower()}")


def cmd_alias_add(store: Store, args: argparse.Namespace) -> None:
    store.alias_add(args.source, args.destinations)
    print(f"added alias {args.source.lower()} -> {', '.join(d.lower() for d in args.destinations)}")


def cmd_alias_list(store: Store, args: argparse.Namespace) -> None:
    for source, destinations in store.alias_list():
        print(f"{source}\t{', '.join(destinations)}")


def cmd_alias_remove(store: Store, args: argparse.Namespace) -> None:
    store.alias_remove(args.source)
    print(f"removed alias {args.source.lower()}")


def cmd_sender_grant(store: Store, args: argparse.Namespace) -> None:
    store.grant_add(args.address, args.domain)
    print(f"{args.address.lower()} may now send as any address of {args.domain.lower()}")


def cmd_sender_revoke(store: Store, args: argparse.Namespace) -> None:
    store.grant_remove(args.address, args.domain)
    print(f"{args.address.lower()} may no longer send for {args.domain.lower()}")


def cmd_sender_list(store: Store, args: argparse.Namespace) -> None:
    for domain in store.grant_list(args.address):
        print(domain)


def cmd_queue_list(store: Store, args: argparse.Namespace) -> None:
    entries = store.queue_list()
    for entry in entries:
        print(f"{entry.queue_id}  {entry.created_at:%Y-%m-%d %H:%M:%S}  {entry.size:>8}  "
              f"{entry.kind}  <{entry.sender}>")
        for recipient, state, attempts, next_at, reply in entry.recipients:
            print(f"    <{recipient}>  {state}  attempts={attempts}  "
                  f"next={next_at:%Y-%m-%d %H:%M:%S}" + (f"  {reply}" if reply else ""))
    print(f"{len(entries)} message(s), {sum(len(e.recipients) for e in entries)} recipient(s)")


def cmd_queue_show(store: Store, args: argparse.Namespace) -> None:
    entries = store.queue_list(args.queue_id)
    raw = store.queue_message(args.queue_id)
    if not entries or raw is None:
        raise CommandError(f"no queued message {args.queue_id}")
    entry = entries[0]
    print(f"Queue-ID: {entry.queue_id}\nKind: {entry.kind}\nSender: <{entry.sender}>\n"
          f"Created: {entry.created_at.isoformat()}\nSize: {entry.size}")
    for recipient, state, attempts, next_at, reply in entry.recipients:
        print(f"Recipient: <{recipient}> state={state} attempts={attempts} "
              f"next={next_at.isoformat()} last-reply={reply or '-'}")
    print()
    header = raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    sys.stdout.write((raw if args.body else header).decode("utf-8", "replace").replace("\r\n",
                                                                                     "\n"))


def cmd_queue_retry(store: Store, args: argparse.Namespace) -> None:
    if not args.queue_id and not args.all:
        raise CommandError("name a queue id, or --all")
    count = store.queue_retry(None if args.all else args.queue_id, datetime.now(UTC))
    if args.queue_id and not count:
        raise CommandError(f"no queued message {args.queue_id}")
    print(f"{count} recipient(s) due now")


def cmd_queue_delete(store: Store, args: argparse.Namespace) -> None:
    count = store.queue_delete(args.queue_id)
    if not count:
        raise CommandError(f"no queued message {args.queue_id}")
    print(f"deleted {args.queue_id.upper()} ({count} recipient(s), no bounce sent)")


def cmd_suppression_list(store: Store, args: argparse.Namespace) -> None:
    for address, reason, created in store.suppression_list():
        print(f"{address}\t{created:%Y-%m-%d %H:%M:%S}\t{reason}")


def cmd_suppression_clear(store: Store, args: argparse.Namespace) -> None:
    if not args.address and not args.all:
        raise CommandError("name an address, or --all")
    count = store.suppression_clear(None if args.all else args.address)
    if args.address and not count:
        raise CommandError(f"{args.address.lower()} is not suppressed")
    print(f"cleared {count} address(es)")


def _utc_time(text: str) -> datetime:
    """An ISO 8601 date or time; one without a zone is UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"not a date or time: {text!r} (use 2027-01-31 or "
                           "2027-01-31T12:00:00+01:00)") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def cmd_key_create(store: Store, args: argparse.Namespace) -> None:
    expires = _utc_time(args.expires) if args.expires else None
    if expires is not None and expires <= datetime.now(UTC):
        raise CommandError("--expires is in the past")
    key, secret = store.api_key_add(args.name, args.scope, args.domain, args.inbox, expires)
    print(f"created key {key.id} ({' '.join(key.scopes)})")
    print(f"secret (shown only now): {secret}")


def cmd_key_list(store: Store, args: argparse.Namespace) -> None:
    now = datetime.now(UTC)
    for key in store.api_key_list():
        if key.revoked_at is not None:
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}"
        elif not key.usable(now):
            state = "expired"
        else:
            state = f"expires {key.expires_at:%Y-%m-%d %H:%M}" if key.expires_at else "active"
        reach = " ".join(key.domains + key.inboxes) or "everything"
        print(f"{key.id}\t{key.prefix}…\t{key.name}\t{' '.join(key.scopes)}\t{reach}\t{state}")


def cmd_key_revoke(store: Store, args: argparse.Namespace) -> None:
    key = store.api_key_revoke(args.id)
    print(f"revoked key {key.id} ({key.name})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailsuite", description="mailsuite administration")
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                        help="configuration file (default: %(default)s)")
    groups = parser.add_subparsers(
        dest="group", required=True,
        metavar="{domain,user,alias,sender,dkim,queue,suppression,key}")

    def add(group: argparse._SubParsersAction, name: str, handler: Callable,
            help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text)
        sub.set_defaults(handler=handler)
        return sub

    domain = groups.add_parser("domain", help="domains we receive mail for")
    dsub = domain.add_subparsers(dest="action", required=True)
    add(dsub, "add", cmd_domain_add, "add a domain").add_argument("name")
    add(dsub, "list", cmd_domain_list, "list domains")
    add(dsub, "dns", cmd_domain_dns, "print the DNS records to publish").add_argument("name")
    remove = add(dsub, "remove", cmd_domain_remove, "remove a domain")
    remove.add_argument("name")
    remove.add_argument("--force", action="store_true",
                        help="also remove its accounts and their mail")

    user = groups.add_parser("user", help="accounts (mailboxes)")
    usub = user.add_subparsers(dest="action", required=True)
    for name, handler, help_text in (("add", cmd_user_add, "add an account"),
                                     ("passwd", cmd_user_passwd, "change a password")):
        sub = add(usub, name, handler, help_text)
        sub.add_argument("address")
        sub.add_argument("--password-stdin", action="store_true",
                         help="read the password from the first line of standard input")
    add(usub, "list", cmd_user_list, "list accounts").add_argument("domain", nargs="?")
    add(usub, "remove", cmd_user_remove, "remove an account and its mail").add_argument("address")

    alias = groups.add_parser("alias", help="aliases and catch-alls (@domain)")
    asub = alias.add_subparsers(dest="action", required=True)
    sub = add(asub, "add", cmd_alias_add, "add an alias")
    sub.add_argument("source", help="local@domain, or @domain for a catch-all")
    sub.add_argument("destinations", nargs="+")
    add(asub, "list", cmd_alias_list, "list aliases")
    add(asub, "remove", cmd_alias_remove, "remove an alias").add_argument("source")

    sender = groups.add_parser("sender", help="domains an account may send for")
    ssub = sender.add_subparsers(dest="action", required=True)
    for name, handler, help_text in (("grant", cmd_sender_grant, "allow a domain"),
                                     ("revoke", cmd_sender_revoke, "withdraw a domain")):
        sub = add(ssub, name, handler, help_text)
        sub.add_argument("address")
        sub.add_argument("domain")
    add(ssub, "list", cmd_sender_list, "list an account's domains").add_argument("address")

    dkim_group = groups.add_parser("dkim", help="DKIM signing keys")
    ksub = dkim_group.add_subparsers(dest="action", required=True)
    add(ksub, "rotate", cmd_dkim_rotate, "make a new key (selector) that signs from now on"
        ).add_argument("name")
    add(ksub, "list", cmd_dkim_list, "list a domain's keys").add_argument("name")

    queue = groups.add_parser("queue", help="the outbound queue")
    qsub = queue.add_subparsers(dest="action", required=True)
    add(qsub, "list", cmd_queue_list, "list queued messages and recipients")
    sub = add(qsub, "show", cmd_queue_show, "show one queued message")
    sub.add_argument("queue_id")
    sub.add_argument("--body", action="store_true", help="print the whole message")
    sub = add(qsub, "retry", cmd_queue_retry, "try waiting recipients now")
    sub.add_argument("queue_id", nargs="?")
    sub.add_argument("--all", action="store_true", help="every queued message")
    add(qsub, "delete", cmd_queue_delete, "drop a message without a bounce"
        ).add_argument("queue_id")

    suppression = groups.add_parser("suppression", help="addresses that hard-bounced")
    psub = suppression.add_subparsers(dest="action", required=True)
    add(psub, "list", cmd_suppression_list, "list suppressed addresses")
    sub = add(psub, "clear", cmd_suppression_clear, "let an address receive again")
    sub.add_argument("address", nargs="?")
    sub.add_argument("--all", action="store_true", help="clear every address")

    key = groups.add_parser("key", help="API keys")
    ysub = key.add_subparsers(dest="action", required=True)
    sub = add(ysub, "create", cmd_key_create, "make a key and print its secret once")
    sub.add_argument("--name", required=True)
    sub.add_argument("--scope", action="append", required=True,
                     help="admin, or e.g. messages:read (repeat for several)")
    sub.add_argument("--domain", action="append", default=[],
                     help="reach only this domain (repeatable)")
    sub.add_argument("--inbox", action="append", default=[],
                     help="reach only this address (repeatable)")
    sub.add_argument("--expires", help="date or time (UTC unless given) it stops working")
    add(ysub, "list", cmd_key_list, "list keys (never their secrets)")
    add(ysub, "revoke", cmd_key_revoke, "stop a key working at once").add_argument("id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.config = load_config(args.config)
        store = open_store(args.config.database_url, pool_size=1)
        try:
            args.handler(store, args)
        finally:
            store.close()
    except (ConfigError, StoreError, AddressError, PasswordError, CommandError, ValueError) as exc:
        print(f"mailsuite: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:  # a database that cannot be reached, for one
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"mailsuite: database error: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
