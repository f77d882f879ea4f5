"""The outbound queue: submissions committed with their local copies, claims, outcomes.

Workers claim due recipients for a while (`claimed_until`); on PostgreSQL with
FOR UPDATE SKIP LOCKED, so processes sharing the database never take the same recipient.
A claim that is never settled (a crash) runs out and the recipient is tried again.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select, update

from mailsuite.store import schema as t
from mailsuite.store.engine import Database, as_utc
from mailsuite.store.mail import Delivery

r = t.outbound_recipients
o = t.outbound


def new_queue_id() -> str:
    return secrets.token_hex(6).upper()


@dataclass(frozen=True)
class Outbound:
    """A message for remote recipients, stored once with one row per recipient."""

    sender: str  # MAIL FROM on the wire; "" for a bounce
    recipients: tuple[str, ...]
    raw: bytes
    return_to: str = ""  # where a DSN goes; "" means never send one
    account_id: int | None = None
    kind: str = "submission"  # submission, forward or bounce
    smtputf8: bool = False
    detail: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Submission:
    """What one accepted message becomes: local copies, queued recipients, or both."""

    queue_id: str
    delivery: Delivery | None = None
    outbound: Outbound | None = None
    sent: Delivery | None = None  # the sender's own copy in its Sent folder


@dataclass(frozen=True)
class QueuedRecipient:
    id: int
    recipient: str
    domain: str
    attempts: int


@dataclass(frozen=True)
class Job:
    """Claimed recipients of one queued message."""

    outbound_id: int
    queue_id: str
    kind: str
    sender: str
    return_to: str
    account_id: int | None
    smtputf8: bool
    eightbit: bool
    size: int
    created_at: datetime
    recipients: tuple[QueuedRecipient, ...]
    data: bytes | None = None  # small messages come with the claim; others via queue_data()


@dataclass(frozen=True)
class Outcome:
    recipient: QueuedRecipient
    state: str  # delivered, deferred, bounced or expired
    reply: str
    remote: str = ""
    next_attempt_at: datetime | None = None
    suppress: bool = False  # a hard bounce at RCPT: refuse the address from now on


@dataclass(frozen=True)
class Settlement:
    """The outcomes of one attempt at some of a job's recipients, and the DSN (if any) to
    route to the job's return_to in the same transaction."""

    job: Job
    outcomes: tuple[Outcome, ...]
    now: datetime
    bounce: bytes | None = None
    holder: str | None = None  # set: only recipients this holder still claims are settled


@dataclass(frozen=True)
class QueueEntry:
    queue_id: str
    created_at: datetime
    kind: str
    sender: str
    size: int
    recipients: tuple[tuple[str, str, int, datetime, str | None], ...]
    # (recipient, state, attempts, next attempt, last reply)


class QueueMixin:
    db: Database

    # --- accepting -----------------------------------------------------------------------
    def submit_many(self, items: list[Submission], timeout: float | None = None) -> list[Any]:
        """Commit many accepted messages in one transaction (each one on its own if that
        fails); an item's entry is its queue id, or the exception that refused it. Past
        `timeout` seconds the work is rolled back and the items fail."""
        return self.db.write_batch(items, self._submit_all, timeout)

    def _submit_all(self, conn: Connection, items: Sequence[Submission]) -> list[str]:
        now = datetime.now(UTC)
        deliveries = [copy for item in items for copy in (item.delivery, item.sent)
                      if copy is not None]
        if deliveries:
            self._deliver_all(conn, deliveries)
        queued = [item for item in items if item.outbound is not None]
        if not queued:
            return [item.queue_id for item in items]
        ids = conn.execute(
            insert(o).returning(o.c.id, sort_by_parameter_order=True),
            [{"queue_id": item.queue_id, "created_at": now, "account_id": ob.account_id,
              "kind": ob.kind, "sender": ob.sender, "return_to": ob.return_to,
              "smtputf8": ob.smtputf8, "eightbit": not ob.raw.isascii(),
              "size": len(ob.raw), "data": ob.raw}
             for item in queued for ob in [item.outbound]]).scalars().all()
        rows, events = [], []
        for item, outbound_id in zip(queued, ids, strict=True):
            ob = item.outbound
            assert ob is not None
            for recipient in dict.fromkeys(ob.recipients):
                rows.append({"outbound_id": outbound_id, "recipient": recipient,
                             "domain": recipient.rpartition("@")[2].lower(), "state": "queued",
                             "attempts": 0, "next_attempt_at": now})
            events.append(_event(now, "queued", ob.account_id, {
                **ob.detail, "queue_id": item.queue_id, "sender": ob.sender, "kind": ob.kind,
                "recipients": list(ob.recipients)}))
        conn.execute(insert(r), rows)
        conn.execute(insert(t.events), events)
        return [item.queue_id for item in items]

    # --- delivering ----------------------------------------------------------------------
    #: messages up to this size come with their claim, saving a query per message
    INLINE_DATA = 256 * 1024

    def queue_claim(self, holder: str, now: datetime, limit: int, lease: float) -> list[Job]:
        """Take up to `limit` due recipients for `lease` seconds, grouped by message."""
        with self.db.write() as conn:
            due = (select(r.c.id)
                   .where(and_(r.c.next_attempt_at <= now,
                               or_(r.c.claimed_until.is_(None), r.c.claimed_until < now)))
                   .order_by(r.c.next_attempt_at, r.c.id).limit(limit))
            if not self.db.is_sqlite:
                due = due.with_for_update(skip_locked=True)
            ids = conn.scalars(due).all()
            if not ids:
                return []
            conn.execute(update(r).where(r.c.id.in_(ids))
                         .values(claimed_by=holder, claimed_until=now + timedelta(seconds=lease)))
            rows = conn.execute(
                select(r.c.id, r.c.recipient, r.c.domain, r.c.attempts, o.c.id.label("oid"),
                       o.c.queue_id, o.c.kind, o.c.sender, o.c.return_to, o.c.account_id,
                       o.c.smtputf8, o.c.eightbit, o.c.size, o.c.created_at)
                .select_from(r.join(o)).where(r.c.id.in_(ids)).order_by(o.c.id, r.c.id)).all()
            small = {row.oid for row in rows if row.size <= self.INLINE_DATA}
            data = dict(conn.execute(select(o.c.id, o.c.data).where(o.c.id.in_(small))).all()
                        ) if small else {}
        jobs: dict[int, tuple[Any, list[QueuedRecipient]]] = {}
        for row in rows:
            jobs.setdefault(row.oid, (row, []))[1].append(
                QueuedRecipient(row.id, row.recipient, row.domain, row.attempts))
        return [Job(row.oid, row.queue_id, row.kind, row.sender, row.return_to, row.account_id,
                    row.smtputf8, row.eightbit, row.size, as_utc(row.created_at), tuple(rcpts),
                    data.get(row.oid))
                for row, rcpts in jobs.values()]

    def queue_renew(self, holder: str, ids: list[int], until: datetime) -> int:
        """Extend `holder`'s claims on these recipients (those it still holds)."""
        renewed = 0
        with self.db.write() as conn:
            for start in range(0, len(ids), 500):
                renewed += conn.execute(
                    update(r).where(and_(r.c.id.in_(ids[start:start + 500]),
                                         r.c.claimed_by == holder))
                    .values(claimed_until=until)).rowcount
        return renewed

    def queue_data(self, outbound_id: int) -> bytes | None:
        with self.db.read() as conn:
            return conn.scalar(select(o.c.data).where(o.c.id == outbound_id))

    def queue_record(self, job: Job, outcomes: Sequence[Outcome], now: datetime,
                     bounce: bytes | None = None) -> None:
        """Settle claimed recipients (see queue_settle_many)."""
        [result] = self.queue_settle_many([Settlement(job, tuple(outcomes), now, bounce)])
        if isinstance(result, Exception):
            raise result

    def queue_settle_many(self, settlements: list[Settlement]) -> list[Any]:
        """Record outcomes, many attempts in one transaction; a DSN is committed with the
        bounce it reports, so a recipient is never settled without its notice."""
        return self.db.write_batch(settlements, self._settle_all)

    def _settle_all(self, conn: Connection, settlements: Sequence[Settlement]) -> list[None]:
        events = []
        for item in settlements:
            job, now = item.job, item.now
            final = False
            for outcome in item.outcomes:
                # An operator deleted it, or (after a lapsed claim) another worker has it.
                mine = r.c.id == outcome.recipient.id
                if item.holder is not None:
                    mine = and_(mine, r.c.claimed_by == item.holder)
                if outcome.state == "deferred":
                    done = conn.execute(update(r).where(mine).values(
                        state="deferred", attempts=r.c.attempts + 1,
                        next_attempt_at=outcome.next_attempt_at, last_attempt_at=now,
                        last_reply=outcome.reply, claimed_by=None, claimed_until=None)).rowcount
                else:
                    done = conn.execute(delete(r).where(mine)).rowcount
                    final = final or (done > 0 and outcome.state != "delivered")
                if not done:
                    continue
                detail = {"queue_id": job.queue_id, "recipient": outcome.recipient.recipient,
                          "reply": outcome.reply, "remote": outcome.remote,
                          "attempt": outcome.recipient.attempts + 1}
                if outcome.next_attempt_at is not None:
                    detail["next_attempt_at"] = outcome.next_attempt_at.isoformat()
                events.append(_event(now, outcome.state, job.account_id, detail))
                if outcome.suppress and self._suppress(conn, outcome, now):
                    events.append(_event(now, "suppressed", job.account_id, detail))
            if item.bounce is not None and job.return_to and final:
                self._route_bounce(conn, job, item.bounce)
        # The message leaves with its last recipient. Its row is locked first (in id order,
        # so two processes never deadlock) so that two processes settling its last two
        # recipients at once cannot both still see the other's and leave it behind.
        for outbound_id in sorted({item.job.outbound_id for item in settlements}):
            lock = select(o.c.id).where(o.c.id == outbound_id)
            conn.execute(lock if self.db.is_sqlite else lock.with_for_update())
            if not conn.scalar(select(func.count()).select_from(r)
                               .where(r.c.outbound_id == outbound_id)):
                conn.execute(delete(o).where(o.c.id == outbound_id))
        if events:
            conn.execute(insert(t.events), events)
        return [None] * len(settlements)

    @staticmethod
    def _suppress(conn: Connection, outcome: Outcome, now: datetime) -> bool:
        address = outcome.recipient.recipient.lower()
        if conn.scalar(select(t.suppressions.c.address)
                       .where(t.suppressions.c.address == address)):
            return False
        conn.execute(insert(t.suppressions).values(address=address, reason=outcome.reply,
                                                   created_at=now))
        return True

    def _route_bounce(self, conn: Connection, job: Job, bounce: bytes) -> None:
        resolution = self._resolve(conn, job.return_to)
        detail = {"bounce_for": job.queue_id}
        delivery = outbound = None
        if resolution.account_ids:
            delivery = Delivery(raw=b"Return-Path: <>\r\n" + bounce,
                                account_ids=resolution.account_ids, detail=detail)
        targets = resolution.external if resolution.kind != "foreign" else (job.return_to,)
        if targets:
            outbound = Outbound(sender="", recipients=tuple(targets), raw=bounce,
                                account_id=job.account_id, kind="bounce", detail=detail,
                                smtputf8=not all(a.isascii() for a in targets))
        if delivery or outbound:
            self._submit_all(conn, [Submission(new_queue_id(), delivery, outbound)])

    def queue_release(self, holder_prefix: str) -> int:
        """Give back every claim a process holds (it is stopping)."""
        with self.db.write() as conn:
            return conn.execute(
                update(r).where(r.c.claimed_by.startswith(holder_prefix, autoescape=True))
                .values(claimed_by=None, claimed_until=None)).rowcount

    # --- operators -----------------------------------------------------------------------
    def queue_list(self, queue_id: str | None = None) -> list[QueueEntry]:
        query = (select(o.c.queue_id, o.c.created_at, o.c.kind, o.c.sender, o.c.size,
                        r.c.recipient, r.c.state, r.c.attempts, r.c.next_attempt_at,
                        r.c.last_reply)
                 .select_from(o.join(r)).order_by(o.c.id, r.c.id))
        if queue_id is not None:
            query = query.where(o.c.queue_id == queue_id.upper())
        entries: dict[str, tuple[Any, list]] = {}
        with self.db.read() as conn:
            for row in conn.execute(query):
                entries.setdefault(row.queue_id, (row, []))[1].append(
                    (row.recipient, row.state, row.attempts, as_utc(row.next_attempt_at),
                     row.last_reply))
        return [QueueEntry(row.queue_id, as_utc(row.created_at), row.kind, row.sender, row.size,
                           tuple(rcpts)) for row, rcpts in entries.values()]

    def queue_depth(self) -> dict[str, int]:
        """Recipients waiting in the queue, by state (queued, deferred)."""
        with self.db.read() as conn:
            return dict(conn.execute(select(r.c.state, func.count()).group_by(r.c.state)).all())

    def queue_message(self, queue_id: str) -> bytes | None:
        with self.db.read() as conn:
            return conn.scalar(select(o.c.data).where(o.c.queue_id == queue_id.upper()))

    def queue_retry(self, queue_id: str | None, now: datetime) -> int:
        """Make a message's (or every message's) waiting recipients due now."""
        query = update(r).values(next_attempt_at=now)
        if queue_id is not None:
            query = query.where(r.c.outbound_id.in_(
                select(o.c.id).where(o.c.queue_id == queue_id.upper())))
        with self.db.write() as conn:
            return conn.execute(query).rowcount

    def queue_delete(self, queue_id: str) -> int:
        """Drop a message from the queue (no bounce); the number of recipients dropped."""
        now = datetime.now(UTC)
        with self.db.write() as conn:
            row = conn.execute(select(o.c.id, o.c.account_id)
                               .where(o.c.queue_id == queue_id.upper())).first()
            if row is None:
                return 0
            recipients = conn.scalars(select(r.c.recipient)
                                      .where(r.c.outbound_id == row.id)).all()
            conn.execute(delete(r).where(r.c.outbound_id == row.id))
            conn.execute(delete(o).where(o.c.id == row.id))
            conn.execute(insert(t.events), [
                _event(now, "deleted", row.account_id,
                       {"queue_id": queue_id.upper(), "recipient": rcpt, "reply": "deleted by "
                        "an operator"}) for rcpt in recipients])
        return len(recipients)

    def queue_size(self) -> int:
        """Recipients still waiting for delivery."""
        with self.db.read() as conn:
            return conn.scalar(select(func.count()).select_from(r))


def _event(now: datetime, kind: str, account_id: int | None, detail: dict) -> dict:
    return {"created_at": now, "kind": kind, "account_id": account_id,
            "detail": json.dumps(detail)}


