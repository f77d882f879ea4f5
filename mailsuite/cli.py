"""The `mailsuite` admin command: acts on the same store as the server, running or not."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError

from mailsuite.addresses import AddressError, parse_account_address
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


def cmd_domain_add(store: Store, args: argparse.Namespace) -> None:
    store.domain_add(args.name)
    print(f"added domain {args.name.lower()}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailsuite", description="mailsuite administration")
    parser.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                        help="configuration file (default: %(default)s)")
    groups = parser.add_subparsers(dest="group", required=True, metavar="{domain,user,alias}")

    def add(group: argparse._SubParsersAction, name: str, handler: Callable,
            help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text)
        sub.set_defaults(handler=handler)
        return sub

    domain = groups.add_parser("domain", help="domains we receive mail for")
    dsub = domain.add_subparsers(dest="action", required=True)
    add(dsub, "add", cmd_domain_add, "add a domain").add_argument("name")
    add(dsub, "list", cmd_domain_list, "list domains")
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
