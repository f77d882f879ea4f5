"""Named leases with an expiry, so a crashed holder never keeps a lock for ever."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from mailsuite.store import schema as t
from mailsuite.store.engine import Database


class LocksMixin:
    db: Database

    def lock_acquire(self, name: str, holder: str, seconds: float) -> bool:
        """Take `name` for `holder` unless someone else holds an unexpired lease on it."""
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=seconds)
        try:
            with self.db.write() as conn:
                taken = conn.execute(
                    update(t.locks)
                    .where(and_(t.locks.c.name == name,
                                or_(t.locks.c.holder == holder, t.locks.c.expires_at < now)))
                    .values(holder=holder, expires_at=expires)
                ).rowcount
                if taken:
                    return True
                if conn.scalar(select(t.locks.c.name).where(t.locks.c.name == name)):
                    return False
                conn.execute(insert(t.locks).values(name=name, holder=holder,
                                                    expires_at=expires))
                return True
        except IntegrityError:
            return False  # another process inserted it first

    def lock_release(self, name: str, holder: str) -> None:
        with self.db.write() as conn:
            conn.execute(delete(t.locks).where(and_(t.locks.c.name == name,
                                                    t.locks.c.holder == holder)))

    def lock_release_all(self, holder_prefix: str) -> int:
        """Give back every lease whose holder starts with `holder_prefix` (a process's own)."""
        with self.db.write() as conn:
            return conn.execute(delete(t.locks).where(
                t.locks.c.holder.startswith(holder_prefix, autoescape=True))).rowcount
