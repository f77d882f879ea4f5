"""The append-only event log: what happened to mail, for operators and the API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select

from mailsuite.store import schema as t
from mailsuite.store.engine import Database


@dataclass(frozen=True)
class Event:
    id: int
    created_at: datetime
    kind: str
    account_id: int | None
    detail: dict


class EventsMixin:
    db: Database

    def record_event(self, kind: str, detail: dict, account_id: int | None = None) -> None:
        with self.db.write() as conn:
            conn.execute(insert(t.events).values(
                created_at=datetime.now(UTC), kind=kind, account_id=account_id,
                detail=json.dumps(detail)))

    def events(self, kind: str | None = None, after_id: int = 0, limit: int = 100) -> list[Event]:
        query = select(t.events).where(t.events.c.id > after_id).order_by(t.events.c.id)
        if kind:
            query = query.where(t.events.c.kind == kind)
        with self.db.read() as conn:
            return [Event(r.id, r.created_at, r.kind, r.account_id, json.loads(r.detail))
                    for r in conn.execute(query.limit(limit))]
