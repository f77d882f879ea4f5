"""API keys: created, listed, revoked, and found by their secret."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, insert, select, update

from mailsuite import apikeys
from mailsuite.addresses import parse_account_address, parse_domain
from mailsuite.store import schema as t
from mailsuite.store.engine import Database, as_utc
from mailsuite.store.errors import NotFound


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    scopes: tuple[str, ...]
    #: when not empty, the key reaches only these domains and/or these inboxes
    domains: tuple[str, ...]
    inboxes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


def _key(row: Row[Any]) -> ApiKey:
    return ApiKey(
        id=row.id, name=row.name, prefix=row.prefix, scopes=tuple(row.scopes.split()),
        domains=tuple(row.domains.split()), inboxes=tuple(row.inboxes.split()),
        created_at=as_utc(row.created_at), expires_at=as_utc(row.expires_at),
        revoked_at=as_utc(row.revoked_at))



class ApiKeysMixin:
    db: Database

    def api_key_add(self, name: str, scopes: Sequence[str], domains: Sequence[str] = (),
                    inboxes: Sequence[str] = (), expires_at: datetime | None = None
                    ) -> tuple[ApiKey, str]:
        """A new key and its secret, which is not stored and so can be shown only now."""
        chosen = apikeys.check_scopes(scopes)
        domain_names = sorted({parse_domain(d) for d in domains})
        addresses = sorted({str(parse_account_address(a)).lower() for a in inboxes})
        secret = apikeys.new_secret()
        key_id = apikeys.new_key_id()
        with self.db.write() as conn:
            known = set(conn.scalars(select(t.domains.c.name).where(
                t.domains.c.name.in_(domain_names))))
            for name_ in domain_names:
                if name_ not in known:
                    raise NotFound(f"unknown domain {name_}")
            known = set(conn.scalars(select(t.accounts.c.address).where(
                t.accounts.c.address.in_(addresses))))
            for address in addresses:
                if address not in known:
                    raise NotFound(f"no account {address}")
            conn.execute(insert(t.api_keys).values(
                id=key_id, name=name, prefix=apikeys.display_prefix(secret),
                secret_sha256=apikeys.secret_hash(secret), scopes=" ".join(chosen),
                domains=" ".join(domain_names), inboxes=" ".join(addresses),
                created_at=datetime.now(UTC),
                expires_at=expires_at.astimezone(UTC) if expires_at else None))
            row = conn.execute(select(t.api_keys).where(t.api_keys.c.id == key_id)).one()
        return _key(row), secret

    def api_key_list(self) -> list[ApiKey]:
        with self.db.read() as conn:
            return [_key(row) for row in conn.execute(
                select(t.api_keys).order_by(t.api_keys.c.id))]

    def api_key_get(self, key_id: str) -> ApiKey | None:
        with self.db.read() as conn:
            row = conn.execute(select(t.api_keys).where(
                t.api_keys.c.id == key_id.lower())).one_or_none()
        return _key(row) if row is not None else None

    def api_key_revoke(self, key_id: str) -> ApiKey:
        """Revoke at once: every process looks keys up in the database on use."""
        with self.db.write() as conn:
            done = conn.execute(update(t.api_keys).where(
                (t.api_keys.c.id == key_id.lower()) & t.api_keys.c.revoked_at.is_(None)
            ).values(revoked_at=datetime.now(UTC)))
            if done.rowcount != 1:
                raise NotFound(f"no active key {key_id}")
            row = conn.execute(select(t.api_keys).where(t.api_keys.c.id == key_id.lower())).one()
        return _key(row)

    def api_key_rotate(self, key_id: str) -> tuple[ApiKey, str]:
        """A new secret for an active key; the old one stops working with this commit."""
        secret = apikeys.new_secret()
        with self.db.write() as conn:
            done = conn.execute(update(t.api_keys).where(
                (t.api_keys.c.id == key_id.lower()) & t.api_keys.c.revoked_at.is_(None)
            ).values(prefix=apikeys.display_prefix(secret),
                     secret_sha256=apikeys.secret_hash(secret)))
            if done.rowcount != 1:
                raise NotFound(f"no active key {key_id}")
            row = conn.execute(select(t.api_keys).where(t.api_keys.c.id == key_id.lower())).one()
        return _key(row), secret

    def api_key_for_secret(self, secret: str, now: datetime | None = None) -> ApiKey | None:
        """The usable key with this secret, or None (unknown, revoked or expired)."""
        if not secret.startswith(apikeys.SECRET_PREFIX):
            return None
        digest = apikeys.secret_hash(secret)
        with self.db.read() as conn:
            row = conn.execute(select(t.api_keys).where(
                t.api_keys.c.secret_sha256 == digest)).one_or_none()
        # The index finds the row; the comparison that decides is constant-time.
        if row is None or not hmac.compare_digest(row.secret_sha256, digest):
            return None
        key = _key(row)
        return key if key.usable(now or datetime.now(UTC)) else None
