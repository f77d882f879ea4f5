"""Domains, accounts and aliases: who we receive mail for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from mailsuite.addresses import parse_account_address, parse_domain
from mailsuite.ids import new_id
from mailsuite.store import schema as t
from mailsuite.store.engine import Database, as_utc
from mailsuite.store.errors import Conflict, InUse, NotFound
from mailsuite.store.mail import MailMixin
from mailsuite.store.mailboxes import MailboxesMixin

# An alias may point at another alias; this bounds the chain (and breaks loops).
MAX_ALIAS_DEPTH = 8


@dataclass(frozen=True)
class Resolution:
    """Where mail for one address goes.

    kind: "local" (account_ids set), "unknown" (our domain, no such address),
    "external" (an alias leads outside our domains), "foreign" (not our domain).
    """

    kind: str
    account_ids: tuple[int, ...] = ()
    external: tuple[str, ...] = ()


@dataclass(frozen=True)
class AccountRow:
    id: int
    address: str
    password_hash: str


@dataclass(frozen=True)
class DomainRow:
    id: int
    api_id: str
    name: str
    created_at: datetime
    verified_at: datetime | None


@dataclass(frozen=True)
class InboxRow:
    id: int
    api_id: str
    address: str
    display_name: str | None
    created_at: datetime


@dataclass(frozen=True)
class AliasRow:
    api_id: str
    source: str  # local@domain, or @domain for a catch-all
    destinations: tuple[str, ...]


#: the password hash of an account made without a password: no password ever matches it
NO_PASSWORD = "!"



def _domain_row(row: Any) -> DomainRow:
    return DomainRow(row.id, row.api_id, row.name, as_utc(row.created_at), as_utc(row.verified_at))


def _inbox_row(row: Any) -> InboxRow:
    return InboxRow(row.id, row.api_id, row.address, row.display_name, as_utc(row.created_at))


def _reach(domains: Sequence[str], addresses: Sequence[str]) -> Any:
    """A WHERE clause on accounts: in one of these domains or one of these addresses."""
    return or_(t.accounts.c.domain_id.in_(
        select(t.domains.c.id).where(t.domains.c.name.in_(domains))),
        t.accounts.c.address.in_(addresses))


def _now() -> datetime:
    return datetime.now(UTC)


class DirectoryMixin:
    db: Database

    # --- domains -------------------------------------------------------------------------
    def domain_add(self, name: str, dkim_keys: Sequence[tuple[str, str, bytes]] = ()
                   ) -> DomainRow:
        """Add a domain with its DKIM keys, (selector, algorithm, private key PEM) each."""
        name = parse_domain(name)
        now = _now()
        try:
            with self.db.write() as conn:
                domain_id = conn.execute(insert(t.domains).values(
                    name=name, created_at=now, api_id=new_id("dom", now)
                ).returning(t.domains.c.id)).scalar_one()
                if dkim_keys:
                    conn.execute(insert(t.dkim_keys), [
                        {"domain_id": domain_id, "selector": selector, "algorithm": algorithm,
                         "private_key": key, "active": True, "created_at": _now()}
                        for selector, algorithm, key in dkim_keys])
                row = conn.execute(select(t.domains).where(t.domains.c.id == domain_id)).one()
        except IntegrityError as exc:
            raise Conflict(f"domain {name} exists already") from exc
        return _domain_row(row)

    def domain_find(self, ref: str) -> DomainRow | None:
        """A domain by its API id (dom_...) or its name."""
        column = t.domains.c.api_id if ref.startswith("dom_") else t.domains.c.name
        with self.db.read() as conn:
            row = conn.execute(select(t.domains).where(
                column == ref.lower().rstrip("."))).one_or_none()
        return _domain_row(row) if row is not None else None

    def domain_set_verified(self, name: str, when: datetime | None) -> DomainRow:
        """Record when the domain's DNS records last checked out (None: they do not)."""
        with self.db.write() as conn:
            if not conn.execute(update(t.domains).where(t.domains.c.name == name)
                                .values(verified_at=when)).rowcount:
                raise NotFound(f"unknown domain {name}")
            return _domain_row(conn.execute(select(t.domains).where(
                t.domains.c.name == name)).one())

    def domain_page(self, after: str | None, limit: int,
                    names: Sequence[str] | None = None) -> list[DomainRow]:
        """Domains by API id (creation order) after `after`; only `names` when given."""
        query = select(t.domains).order_by(t.domains.c.api_id).limit(limit)
        if after:
            query = query.where(t.domains.c.api_id > after)
        if names is not None:
            query = query.where(t.domains.c.name.in_(names))
        with self.db.read() as conn:
            return [_domain_row(row) for row in conn.execute(query)]

    def domain_account_count(self, name: str) -> int:
        with self.db.read() as conn:
            return conn.scalar(select(func.count()).select_from(t.accounts).join(t.domains)
                               .where(t.domains.c.name == name))

    def domain_list(self) -> list[tuple[str, int]]:
        """(domain, number of accounts), sorted by name."""
        query = (
            select(t.domains.c.name, func.count(t.accounts.c.id))
            .select_from(t.domains.outerjoin(t.accounts))
            .group_by(t.domains.c.name)
            .order_by(t.domains.c.name)
        )
        with self.db.read() as conn:
            return [(name, count) for name, count in conn.execute(query)]

    def domain_remove(self, name: str, force: bool = False) -> None:
        name = parse_domain(name)
        with self.db.write() as conn:
            domain_id = self._domain_id(conn, name)
            account_ids = conn.scalars(
                select(t.accounts.c.id).where(t.accounts.c.domain_id == domain_id)
            ).all()
            if account_ids and not force:
                raise InUse(f"domain {name} still has {len(account_ids)} account(s); use --force")
            for account_id in account_ids:
                self._delete_account(conn, account_id)
            conn.execute(delete(t.domains).where(t.domains.c.id == domain_id))

    def is_local_domain(self, name: str) -> bool:
        with self.db.read() as conn:
            return self._find_domain(conn, name.lower().rstrip(".")) is not None

    # --- accounts ------------------------------------------------------------------------
    def account_add(self, address: str, password_hash: str,
                    display_name: str | None = None) -> int:
        parsed = parse_account_address(address)
        now = _now()
        try:
            with self.db.write() as conn:
                domain_id = self._domain_id(conn, parsed.domain)
                account_id = conn.execute(
                    insert(t.accounts)
                    .values(domain_id=domain_id, address=parsed.normal,
                            password_hash=password_hash, created_at=now,
                            api_id=new_id("inb", now), display_name=display_name)
                    .returning(t.accounts.c.id)
                ).scalar_one()
                self._create_default_mailboxes(conn, account_id)
                return account_id
        except IntegrityError as exc:
            raise Conflict(f"account {parsed.normal} exists already") from exc

    def account_list(self, domain: str | None = None) -> list[str]:
        query = select(t.accounts.c.address).order_by(t.accounts.c.address)
        with self.db.read() as conn:
            if domain:
                query = query.where(t.accounts.c.domain_id == self._domain_id(
                    conn, parse_domain(domain)))
            return list(conn.scalars(query))

    def account_get(self, address: str) -> AccountRow | None:
        with self.db.read() as conn:
            row = conn.execute(
                select(t.accounts.c.id, t.accounts.c.address, t.accounts.c.password_hash)
                .where(t.accounts.c.address == address.lower())
            ).first()
        return AccountRow(*row) if row else None

    def inbox_find(self, ref: str) -> InboxRow | None:
        """An account by its API id (inb_...) or its address."""
        column = t.accounts.c.api_id if ref.startswith("inb_") else t.accounts.c.address
        with self.db.read() as conn:
            row = conn.execute(select(t.accounts).where(column == ref.lower())).one_or_none()
        return _inbox_row(row) if row is not None else None

    def inbox_page(self, after: str | None, limit: int, domain: str | None = None,
                   reach: tuple[Sequence[str], Sequence[str]] | None = None) -> list[InboxRow]:
        """Accounts by API id after `after`; of one domain, and within reach (domains,
        addresses) when given."""
        query = select(t.accounts).order_by(t.accounts.c.api_id).limit(limit)
        if after:
            query = query.where(t.accounts.c.api_id > after)
        if domain is not None:
            query = query.where(t.accounts.c.domain_id.in_(
                select(t.domains.c.id).where(t.domains.c.name == domain)))
        if reach is not None:
            query = query.where(_reach(*reach))
        with self.db.read() as conn:
            return [_inbox_row(row) for row in conn.execute(query)]

    def account_set_display_name(self, address: str, display_name: str | None) -> None:
        with self.db.write() as conn:
            if not conn.execute(update(t.accounts).where(t.accounts.c.address == address.lower())
                                .values(display_name=display_name)).rowcount:
                raise NotFound(f"no account {address.lower()}")

    def account_set_password(self, address: str, password_hash: str) -> None:
        parsed = parse_account_address(address)
        with self.db.write() as conn:
            done = conn.execute(
                update(t.accounts).where(t.accounts.c.address == parsed.normal)
                .values(password_hash=password_hash)
            ).rowcount
        if not done:
            raise NotFound(f"no account {parsed.normal}")

    def account_remove(self, address: str) -> None:
        parsed = parse_account_address(address)
        with self.db.write() as conn:
            account_id = conn.scalar(
                select(t.accounts.c.id).where(t.accounts.c.address == parsed.normal))
            if account_id is None:
                raise NotFound(f"no account {parsed.normal}")
            self._delete_account(conn, account_id)

    # --- aliases -------------------------------------------------------------------------
    def alias_add(self, source: str, destinations: list[str]) -> AliasRow:
        """source is local@domain or @domain (catch-all); destinations are any addresses.
        An existing alias gets the new destinations and keeps its id."""
        source_key, domain = self._alias_source(source)
        dests = sorted({parse_account_address(d).normal for d in destinations})
        if not dests:
            raise ValueError("an alias needs at least one destination")
        with self.db.write() as conn:
            domain_id = self._domain_id(conn, domain)
            taken = conn.scalar(select(t.accounts.c.id).where(t.accounts.c.address == source_key))
            if taken is not None:
                raise Conflict(f"{source_key} is an account; an alias cannot shadow it")
            existing = set(conn.scalars(
                select(t.aliases.c.destination).where(t.aliases.c.source == source_key)))
            new = [d for d in dests if d not in existing]
            if not new:
                raise Conflict(f"alias {source_key} already has those destinations")
            api_id = conn.scalar(select(t.aliases.c.api_id).where(
                t.aliases.c.source == source_key).limit(1)) or new_id("ali")
            conn.execute(insert(t.aliases), [
                {"domain_id": domain_id, "source": source_key, "destination": d,
                 "api_id": api_id} for d in new
            ])
            return AliasRow(api_id, source_key, tuple(sorted(existing.union(new))))

    def alias_find(self, ref: str) -> AliasRow | None:
        """An alias by its API id (ali_...) or its source."""
        if ref.startswith("ali_"):
            where = t.aliases.c.api_id == ref.lower()
        else:
            where = t.aliases.c.source == ref.strip().lower()
        rows = self._alias_rows(where, None)
        return rows[0] if rows else None

    def alias_page(self, after: str | None, limit: int,
                   domains: Sequence[str] | None = None) -> list[AliasRow]:
        """Aliases by API id after `after`; only those of `domains` when given."""
        ids = select(t.aliases.c.api_id).distinct().order_by(t.aliases.c.api_id).limit(limit)
        if after:
            ids = ids.where(t.aliases.c.api_id > after)
        if domains is not None:
            ids = ids.where(t.aliases.c.domain_id.in_(
                select(t.domains.c.id).where(t.domains.c.name.in_(domains))))
        return self._alias_rows(t.aliases.c.api_id.in_(ids.scalar_subquery()), limit)

    def _alias_rows(self, where: Any, limit: int | None) -> list[AliasRow]:
        with self.db.read() as conn:
            rows = conn.execute(select(t.aliases.c.api_id, t.aliases.c.source,
                                       t.aliases.c.destination).where(where)
                                .order_by(t.aliases.c.api_id, t.aliases.c.destination)).all()
        grouped: dict[str, AliasRow] = {}
        for api_id, source, destination in rows:
            row = grouped.get(api_id) or AliasRow(api_id, source, ())
            grouped[api_id] = AliasRow(api_id, source, (*row.destinations, destination))
        return list(grouped.values())[:limit]

    def alias_list(self) -> list[tuple[str, list[str]]]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(t.aliases.c.source, t.aliases.c.destination)
                .order_by(t.aliases.c.source, t.aliases.c.destination)
            ).all()
        grouped: dict[str, list[str]] = {}
        for source, destination in rows:
            grouped.setdefault(source, []).append(destination)
        return list(grouped.items())

    def alias_remove(self, source: str) -> None:
        source_key, _ = self._alias_source(source)
        with self.db.write() as conn:
            if not conn.execute(delete(t.aliases).where(t.aliases.c.source == source_key)).rowcount:
                raise NotFound(f"no alias {source_key}")

    # --- resolution ----------------------------------------------------------------------
    def resolve(self, address: str) -> Resolution:
        """Where mail for `address` (already a parsed, normal local@domain) goes."""
        with self.db.read() as conn:
            return self._resolve(conn, address)

    def _resolve(self, conn: Connection, address: str) -> Resolution:
        address = address.lower()
        # The common case, an account's own address, in one query.
        account_id = conn.scalar(select(t.accounts.c.id).where(t.accounts.c.address == address))
        if account_id is not None:
            return Resolution("local", (account_id,))
        local, _, domain = address.rpartition("@")
        if self._find_domain(conn, domain) is None:
            return Resolution("foreign")
        accounts: list[int] = []
        external: list[str] = []
        if not self._expand(conn, f"{local}@{domain}", accounts, external, set(), 0):
            return Resolution("unknown")
        return Resolution("external" if external else "local",
                          tuple(dict.fromkeys(accounts)), tuple(dict.fromkeys(external)))

    def _expand(self, conn: Connection, address: str, accounts: list[int], external: list[str],
                seen: set[str], depth: int) -> bool:
        if address in seen or depth > MAX_ALIAS_DEPTH:
            return True  # a loop or a long chain ends here; what was found so far stands
        seen.add(address)
        account_id = conn.scalar(select(t.accounts.c.id).where(t.accounts.c.address == address))
        if account_id is not None:
            accounts.append(account_id)
            return True
        domain = address.rpartition("@")[2]
        targets = conn.scalars(
            select(t.aliases.c.destination).where(t.aliases.c.source == address)).all()
        if not targets:
            targets = conn.scalars(
                select(t.aliases.c.destination).where(t.aliases.c.source == "@" + domain)).all()
        if not targets:
            return False
        for target in targets:
            if self._find_domain(conn, target.rpartition("@")[2]) is None:
                external.append(target)
            elif not self._expand(conn, target, accounts, external, seen, depth + 1):
                return False
        return True

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _alias_source(source: str) -> tuple[str, str]:
        source = source.strip()
        if source.startswith("@"):
            domain = parse_domain(source[1:])
            return "@" + domain, domain
        parsed = parse_account_address(source)
        return parsed.normal, parsed.domain

    @staticmethod
    def _find_domain(conn: Connection, name: str) -> int | None:
        return conn.scalar(select(t.domains.c.id).where(t.domains.c.name == name))

    def _domain_id(self, conn: Connection, name: str) -> int:
        domain_id = self._find_domain(conn, name)
        if domain_id is None:
            raise NotFound(f"unknown domain {name}")
        return domain_id

    @staticmethod
    def _create_default_mailboxes(conn: Connection, account_id: int) -> None:
        for name, special in t.DEFAULT_MAILBOXES:
            MailboxesMixin._insert_mailbox(conn, account_id, name, special)
        conn.execute(insert(t.subscriptions), [
            {"account_id": account_id, "name": name} for name, _ in t.DEFAULT_MAILBOXES])

    @staticmethod
    def _delete_account(conn: Connection, account_id: int) -> None:
        mailbox_ids = select(t.mailboxes.c.id).where(t.mailboxes.c.account_id == account_id)
        blob_ids = select(t.messages.c.blob_id).where(t.messages.c.mailbox_id.in_(mailbox_ids))
        orphan_candidates = set(conn.scalars(blob_ids))
        conn.execute(delete(t.messages).where(t.messages.c.mailbox_id.in_(mailbox_ids)))
        conn.execute(delete(t.mailboxes).where(t.mailboxes.c.account_id == account_id))
        conn.execute(delete(t.subscriptions).where(t.subscriptions.c.account_id == account_id))
        conn.execute(update(t.events).where(t.events.c.account_id == account_id)
                     .values(account_id=None))
        conn.execute(delete(t.accounts).where(t.accounts.c.id == account_id))
        MailMixin._drop_orphan_blobs(conn, orphan_candidates)
