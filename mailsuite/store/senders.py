"""Who may send what: DKIM keys, sender identities and grants, suppressions, shared settings."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from mailsuite.addresses import parse_account_address, parse_domain
from mailsuite.store import schema as t
from mailsuite.store.directory import Resolution
from mailsuite.store.engine import Database
from mailsuite.store.errors import Conflict, NotFound


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str
    private_key: bytes
    active: bool


@dataclass(frozen=True)
class SenderIdentities:
    """The envelope and From: addresses an account may use."""

    addresses: frozenset[str]
    domains: frozenset[str]

    def allows(self, address: str) -> bool:
        address = address.lower()
        return address in self.addresses or address.rpartition("@")[2] in self.domains


class SendersMixin:
    db: Database

    # --- DKIM keys -----------------------------------------------------------------------
    def dkim_key_add(self, domain: str, selector: str, algorithm: str, private_key: bytes) -> None:
        """Store a key and make it the one that signs for its algorithm."""
        domain = parse_domain(domain)
        with self.db.write() as conn:
            domain_id = conn.scalar(select(t.domains.c.id).where(t.domains.c.name == domain))
            if domain_id is None:
                raise NotFound(f"unknown domain {domain}")
            conn.execute(update(t.dkim_keys).where(and_(
                t.dkim_keys.c.domain_id == domain_id, t.dkim_keys.c.algorithm == algorithm))
                .values(active=False))
            try:
                conn.execute(insert(t.dkim_keys).values(
                    domain_id=domain_id, selector=selector, algorithm=algorithm,
                    private_key=private_key, active=True, created_at=datetime.now(UTC)))
            except IntegrityError as exc:
                raise Conflict(f"selector {selector} exists already for {domain}") from exc

    def dkim_keys(self, domain: str, active_only: bool = True) -> list[SigningKey]:
        """The domain's keys, newest first; RSA before Ed25519 among the active ones."""
        query = (select(t.domains.c.name, t.dkim_keys.c.selector, t.dkim_keys.c.algorithm,
                        t.dkim_keys.c.private_key, t.dkim_keys.c.active)
                 .select_from(t.dkim_keys.join(t.domains))
                 .where(t.domains.c.name == domain.lower().rstrip("."))
                 .order_by(t.dkim_keys.c.active.desc(), t.dkim_keys.c.algorithm.desc(),
                           t.dkim_keys.c.id.desc()))
        if active_only:
            query = query.where(t.dkim_keys.c.active.is_(True))
        with self.db.read() as conn:
            return [SigningKey(*row) for row in conn.execute(query)]

    # --- sender identities ---------------------------------------------------------------
    def sender_identities(self, account_id: int) -> SenderIdentities:
        """Its own address, the aliases that lead straight to it, and its granted domains."""
        with self.db.read() as conn:
            own = conn.scalar(select(t.accounts.c.address).where(t.accounts.c.id == account_id))
            if own is None:
                raise NotFound(f"no account {account_id}")
            aliases = conn.scalars(select(t.aliases.c.source).where(
                t.aliases.c.destination == own)).all()
            domains = conn.scalars(select(t.send_grants.c.domain).where(
                t.send_grants.c.account_id == account_id)).all()
        # A catch-all (@domain) is a way to receive, not a licence to send as anyone there.
        return SenderIdentities(frozenset([own, *(a for a in aliases if not a.startswith("@"))]),
                                frozenset(domains))

    def grant_add(self, address: str, domain: str) -> None:
        account_id = self._account_id(address)
        try:
            with self.db.write() as conn:
                conn.execute(insert(t.send_grants).values(account_id=account_id,
                                                          domain=parse_domain(domain)))
        except IntegrityError as exc:
            raise Conflict(f"{address} may send for {domain} already") from exc

    def grant_remove(self, address: str, domain: str) -> None:
        account_id = self._account_id(address)
        with self.db.write() as conn:
            gone = conn.execute(delete(t.send_grants).where(and_(
                t.send_grants.c.account_id == account_id,
                t.send_grants.c.domain == parse_domain(domain)))).rowcount
        if not gone:
            raise NotFound(f"{address} has no grant for {domain}")

    def grant_list(self, address: str) -> list[str]:
        account_id = self._account_id(address)
        with self.db.read() as conn:
            return list(conn.scalars(select(t.send_grants.c.domain).where(
                t.send_grants.c.account_id == account_id).order_by(t.send_grants.c.domain)))

    def _account_id(self, address: str) -> int:
        normal = parse_account_address(address).normal
        account = self.account_get(normal)  # type: ignore[attr-defined]
        if account is None:
            raise NotFound(f"no account {normal}")
        return account.id

    # --- suppressions --------------------------------------------------------------------
    def route_recipient(self, address: str) -> tuple[Resolution, str | None]:
        """Where a submitted recipient goes, and why it is suppressed (if it is)."""
        with self.db.read() as conn:
            resolution = self._resolve(conn, address)  # type: ignore[attr-defined]
            reason = None
            if resolution.kind == "foreign":
                reason = conn.scalar(select(t.suppressions.c.reason).where(
                    t.suppressions.c.address == address.lower()))
        return resolution, reason

    def suppression_reason(self, address: str) -> str | None:
        with self.db.read() as conn:
            return conn.scalar(select(t.suppressions.c.reason).where(
                t.suppressions.c.address == address.lower()))

    def suppression_list(self) -> list[tuple[str, str, datetime]]:
        with self.db.read() as conn:
            return [tuple(row) for row in conn.execute(
                select(t.suppressions.c.address, t.suppressions.c.reason,
                       t.suppressions.c.created_at).order_by(t.suppressions.c.address))]

    def suppression_clear(self, address: str | None = None) -> int:
        """Forget one address, or every one when `address` is None."""
        with self.db.write() as conn:
            query = delete(t.suppressions)
            if address is not None:
                query = query.where(t.suppressions.c.address == address.lower())
            return conn.execute(query).rowcount

    # --- settings ------------------------------------------------------------------------
    def shared_secret(self, name: str) -> str:
        """A random secret every process on this database shares, made at first use."""
        with self.db.read() as conn:
            value = conn.scalar(select(t.settings.c.value).where(t.settings.c.name == name))
        if value is not None:
            return value
        try:
            with self.db.write() as conn:
                conn.execute(insert(t.settings).values(name=name, value=secrets.token_hex(32)))
        except IntegrityError:
            pass  # another process made it first; theirs is the one
        with self.db.read() as conn:
            return conn.scalar(select(t.settings.c.value).where(t.settings.c.name == name))
