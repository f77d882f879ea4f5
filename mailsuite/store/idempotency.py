"""Idempotency keys of the HTTP API: the first request with a key runs, a repeat gets its
stored answer. Kept in the database, so they hold across restarts and processes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from mailsuite.store import schema as t
from mailsuite.store.engine import Database, as_utc

#: how long a stored answer is replayed
KEEP = timedelta(hours=24)
#: a request still "in progress" after this long died with its process; a repeat may run
ABANDONED = timedelta(minutes=5)


@dataclass(frozen=True)
class Idempotency:
    """What to do with a request: run it ("run"), or answer with a stored "replay", or refuse
    it as a "mismatch" (another body) or "in_progress" (the first is still running)."""

    outcome: str
    status: int = 0
    body: bytes = b""


class IdempotencyMixin:
    db: Database

    def idempotency_begin(self, api_key_id: str, key: str, fingerprint: str,
                          now: datetime | None = None) -> Idempotency:
        now = now or datetime.now(UTC)
        where = and_(t.idempotency.c.api_key_id == api_key_id, t.idempotency.c.key == key)
        with self.db.write() as conn:
            conn.execute(delete(t.idempotency).where(and_(
                t.idempotency.c.api_key_id == api_key_id, t.idempotency.c.created_at < now - KEEP)))
            row = conn.execute(select(t.idempotency).where(where)).one_or_none()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(t.idempotency).values(
                            api_key_id=api_key_id, key=key, fingerprint=fingerprint,
                            created_at=now, status=None, body=None))
                    return Idempotency("run")
                except IntegrityError:  # another process took it meanwhile
                    row = conn.execute(select(t.idempotency).where(where)).one()
            if row.fingerprint != fingerprint:
                return Idempotency("mismatch")
            if row.status is not None:
                return Idempotency("replay", row.status, row.body)
            if as_utc(row.created_at) > now - ABANDONED:
                return Idempotency("in_progress")
            conn.execute(update(t.idempotency).where(where).values(created_at=now))
            return Idempotency("run")

    def idempotency_finish(self, api_key_id: str, key: str, status: int, body: bytes) -> None:
        """Keep the answer; a server failure (5xx) forgets the key so a retry runs again."""
        where = and_(t.idempotency.c.api_key_id == api_key_id, t.idempotency.c.key == key)
        with self.db.write() as conn:
            if status >= 500:
                conn.execute(delete(t.idempotency).where(where))
            else:
                conn.execute(update(t.idempotency).where(where).values(status=status, body=body))
