"""Storing delivered messages and reading them back."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, select, update

from mailsuite.store import schema as t
from mailsuite.store.engine import Database
from mailsuite.store.errors import NotFound


@dataclass(frozen=True)
class Delivery:
    """One accepted message for one or more local accounts, stored once as a blob."""

    raw: bytes
    account_ids: tuple[int, ...]
    detail: dict = field(default_factory=dict)  # recorded with the "received" event
    mailbox: str = "INBOX"
    flags: str = ""
    internal_date: datetime | None = None


@dataclass(frozen=True)
class Delivered:
    blob_id: int
    uids: tuple[tuple[int, int], ...]  # (account_id, uid)


@dataclass(frozen=True)
class Listing:
    """A mailbox's messages as (uid, size), by UID, with the mailbox's UIDVALIDITY."""

    uidvalidity: int
    messages: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class StoredMessage:
    uid: int
    modseq: int
    flags: str
    internal_date: datetime
    size: int
    blob_id: int
    raw: bytes


class MailMixin:
    db: Database

    def deliver_many(self, deliveries: list[Delivery]) -> list[Delivered | Exception]:
        """Commit many deliveries in one transaction (one fsync for all of them).

        If the shared transaction fails, each delivery is retried in a transaction of its own,
        so one bad message never costs the others; a delivery's entry is then its exception.
        """
        try:
            with self.db.write() as conn:
                return [self._deliver(conn, d) for d in deliveries]
        except Exception as exc:
            if len(deliveries) == 1:
                return [exc]
        results: list[Delivered | Exception] = []
        for delivery in deliveries:
            try:
                with self.db.write() as conn:
                    results.append(self._deliver(conn, delivery))
            except Exception as exc:
                results.append(exc)
        return results

    def deliver(self, delivery: Delivery) -> Delivered:
        result = self.deliver_many([delivery])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _deliver(self, conn: Connection, delivery: Delivery) -> Delivered:
        now = datetime.now(UTC)
        blob_id = conn.execute(
            insert(t.blobs).values(
                sha256=hashlib.sha256(delivery.raw).hexdigest(),
                size=len(delivery.raw),
                data=delivery.raw,
            ).returning(t.blobs.c.id)
        ).scalar_one()
        uids = []
        for account_id in sorted(set(delivery.account_ids)):  # sorted: a stable lock order
            # The UID comes from the row we lock and bump, in this transaction: never MAX+1.
            mailbox_id, uid, modseq = conn.execute(
                update(t.mailboxes)
                .where(and_(t.mailboxes.c.account_id == account_id,
                            t.mailboxes.c.name == delivery.mailbox))
                .values(uidnext=t.mailboxes.c.uidnext + 1,
                        highestmodseq=t.mailboxes.c.highestmodseq + 1)
                .returning(t.mailboxes.c.id, t.mailboxes.c.uidnext - 1,
                           t.mailboxes.c.highestmodseq)
            ).one()
            conn.execute(insert(t.messages).values(
                mailbox_id=mailbox_id, uid=uid, modseq=modseq, flags=delivery.flags,
                internal_date=delivery.internal_date or now, size=len(delivery.raw),
                blob_id=blob_id,
            ))
            conn.execute(insert(t.events).values(
                created_at=now, kind="received", account_id=account_id,
                detail=json.dumps({**delivery.detail, "uid": uid, "mailbox": delivery.mailbox}),
            ))
            uids.append((account_id, uid))
        return Delivered(blob_id, tuple(uids))

    def listing(self, account_id: int, mailbox: str = "INBOX") -> Listing:
        with self.db.read() as conn:
            box = self._mailbox(conn, account_id, mailbox)
            rows = conn.execute(
                select(t.messages.c.uid, t.messages.c.size)
                .where(t.messages.c.mailbox_id == box.id).order_by(t.messages.c.uid)
            ).all()
        return Listing(box.uidvalidity, tuple((uid, size) for uid, size in rows))

    def message_bytes(self, account_id: int, mailbox: str, uid: int) -> bytes | None:
        """The raw message, or None once it has been expunged."""
        with self.db.read() as conn:
            box = self._mailbox(conn, account_id, mailbox)
            return conn.scalar(
                select(t.blobs.c.data).select_from(t.messages.join(t.blobs))
                .where(and_(t.messages.c.mailbox_id == box.id, t.messages.c.uid == uid)))

    def add_flag(self, account_id: int, mailbox: str, uids: list[int], flag: str) -> int:
        """Add `flag` to the messages that lack it; each change gets a new MODSEQ."""
        changed = 0
        with self.db.write() as conn:
            box = self._mailbox(conn, account_id, mailbox)
            rows = conn.execute(
                select(t.messages.c.id, t.messages.c.flags)
                .where(and_(t.messages.c.mailbox_id == box.id, t.messages.c.uid.in_(uids)))
            ).all()
            for message_id, flags in rows:
                if flag in flags.split():
                    continue
                modseq = self._bump_modseq(conn, box.id)
                conn.execute(update(t.messages).where(t.messages.c.id == message_id)
                             .values(flags=(flags + " " + flag).strip(), modseq=modseq))
                changed += 1
        return changed

    def expunge(self, account_id: int, mailbox: str, uids: list[int]) -> int:
        """Remove messages for good; blobs no copy refers to any more go with them."""
        with self.db.write() as conn:
            box = self._mailbox(conn, account_id, mailbox)
            where = and_(t.messages.c.mailbox_id == box.id, t.messages.c.uid.in_(uids))
            blob_ids = set(conn.scalars(select(t.messages.c.blob_id).where(where)))
            removed = conn.execute(delete(t.messages).where(where)).rowcount
            if removed:
                self._bump_modseq(conn, box.id)
                self._drop_orphan_blobs(conn, blob_ids)
        return removed

    @staticmethod
    def _mailbox(conn: Connection, account_id: int, name: str) -> Any:
        box = conn.execute(
            select(t.mailboxes.c.id, t.mailboxes.c.uidvalidity)
            .where(and_(t.mailboxes.c.account_id == account_id, t.mailboxes.c.name == name))
        ).first()
        if box is None:
            raise NotFound(f"no mailbox {name}")
        return box

    @staticmethod
    def _bump_modseq(conn: Connection, mailbox_id: int) -> int:
        return conn.execute(
            update(t.mailboxes).where(t.mailboxes.c.id == mailbox_id)
            .values(highestmodseq=t.mailboxes.c.highestmodseq + 1)
            .returning(t.mailboxes.c.highestmodseq)
        ).scalar_one()

    @staticmethod
    def _drop_orphan_blobs(conn: Connection, blob_ids: set[int]) -> None:
        if not blob_ids:
            return
        still_used = set(conn.scalars(
            select(t.messages.c.blob_id).where(t.messages.c.blob_id.in_(blob_ids))))
        orphans = blob_ids - still_used
        if orphans:
            conn.execute(delete(t.blobs).where(t.blobs.c.id.in_(orphans)))

    def blob_count(self) -> int:
        with self.db.read() as conn:
            return conn.scalar(select(func.count()).select_from(t.blobs))

    def messages(self, address: str, mailbox: str = "INBOX") -> list[StoredMessage]:
        """Every message in one mailbox of one account, by UID."""
        query = (
            select(t.messages.c.uid, t.messages.c.modseq, t.messages.c.flags,
                   t.messages.c.internal_date, t.messages.c.size, t.messages.c.blob_id,
                   t.blobs.c.data)
            .select_from(t.messages.join(t.blobs).join(t.mailboxes).join(t.accounts))
            .where(and_(t.accounts.c.address == address.lower(), t.mailboxes.c.name == mailbox))
            .order_by(t.messages.c.uid)
        )
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        return [StoredMessage(uid, modseq, flags, _utc(date), size, blob_id, raw)
                for uid, modseq, flags, date, size, blob_id, raw in rows]


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
