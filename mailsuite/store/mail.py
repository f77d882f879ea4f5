"""Storing delivered messages and reading them back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, select, update

from mailsuite.store import schema as t
from mailsuite.store.engine import Database, as_utc, mark_changed
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
    structure: tuple[bytes, bytes, bytes] | None = None  # IMAP (envelope, bodystructure, body)
    event: str = "received"  # the kind of event recorded for it


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
class FetchRow:
    uid: int
    flags: str
    internal_date: datetime
    size: int
    modseq: int
    structure: tuple[bytes | None, bytes | None, bytes | None] | None
    raw: bytes | None


@dataclass(frozen=True)
class StoredMessage:
    uid: int
    modseq: int
    flags: str
    internal_date: datetime
    size: int
    blob_id: int
    raw: bytes


def _target_mailboxes(conn: Connection,
                      deliveries: list[Delivery]) -> Callable[[Delivery, int], str]:
    """Where each delivery lands per account: its mailbox; else, for a special-use one
    (Junk), the account's mailbox with that attribute (the user may have renamed it); else
    INBOX, which every account keeps. A missing folder must not make a delivery fail for
    good, nor be retried forever."""
    special = dict(t.DEFAULT_MAILBOXES)
    names = {d.mailbox for d in deliveries} - {"INBOX"}
    if not names:
        return lambda delivery, account_id: delivery.mailbox
    accounts = {a for d in deliveries if d.mailbox != "INBOX" for a in d.account_ids}
    uses = {special[n] for n in names if special.get(n)}
    rows = conn.execute(
        select(t.mailboxes.c.account_id, t.mailboxes.c.name, t.mailboxes.c.special_use)
        .where(and_(t.mailboxes.c.account_id.in_(accounts),
                    t.mailboxes.c.name.in_(names) | t.mailboxes.c.special_use.in_(uses)))
        .order_by(t.mailboxes.c.id)).all()
    found = {(a, name) for a, name, _ in rows}
    by_use: dict[tuple[int, str], str] = {}
    for account_id, name, use in rows:
        by_use.setdefault((account_id, use), name)

    def target(delivery: Delivery, account_id: int) -> str:
        if delivery.mailbox == "INBOX" or (account_id, delivery.mailbox) in found:
            return delivery.mailbox
        return by_use.get((account_id, special.get(delivery.mailbox) or ""), "INBOX")

    return target


class MailMixin:
    db: Database

    def deliver_many(self, deliveries: list[Delivery]) -> list[Delivered | Exception]:
        """Commit many deliveries in one transaction (one fsync for all of them); if that
        fails, each in one of its own, so one bad message never costs the others (its entry
        is then its exception)."""
        return self.db.write_batch(deliveries, self._deliver_all)

    def deliver(self, delivery: Delivery) -> Delivered:
        result = self.deliver_many([delivery])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _deliver_all(self, conn: Connection, deliveries: list[Delivery]) -> list[Delivered]:
        """Store a batch with a handful of statements, however many messages it holds."""
        now = datetime.now(UTC)
        blob_ids = conn.execute(
            insert(t.blobs).returning(t.blobs.c.id, sort_by_parameter_order=True),
            [{"sha256": hashlib.sha256(d.raw).hexdigest(), "size": len(d.raw), "data": d.raw}
             for d in deliveries],
        ).scalars().all()
        target = _target_mailboxes(conn, deliveries)
        # One UPDATE per mailbox takes as many UIDs as the batch puts there, in this
        # transaction, from the row it locks: never MAX(uid)+1. Sorted: a stable lock order.
        wanted: dict[tuple[int, str], int] = {}
        for delivery in deliveries:
            for account_id in set(delivery.account_ids):
                key = (account_id, target(delivery, account_id))
                wanted[key] = wanted.get(key, 0) + 1
        next_uid: dict[tuple[int, str], list[int]] = {}
        for (account_id, mailbox), count in sorted(wanted.items()):
            row = conn.execute(
                update(t.mailboxes)
                .where(and_(t.mailboxes.c.account_id == account_id,
                            t.mailboxes.c.name == mailbox))
                .values(uidnext=t.mailboxes.c.uidnext + count,
                        highestmodseq=t.mailboxes.c.highestmodseq + count)
                .returning(t.mailboxes.c.id, t.mailboxes.c.uidnext, t.mailboxes.c.highestmodseq)
            ).one()
            mailbox_id, uidnext, highestmodseq = row
            next_uid[(account_id, mailbox)] = [mailbox_id, uidnext - count,
                                               highestmodseq - count + 1]
            mark_changed(conn, mailbox_id)
        messages, events, results = [], [], []
        for delivery, blob_id in zip(deliveries, blob_ids, strict=True):
            envelope, bodystructure, body = delivery.structure or (None, None, None)
            uids = []
            for account_id in sorted(set(delivery.account_ids)):
                mailbox = target(delivery, account_id)
                slot = next_uid[(account_id, mailbox)]
                mailbox_id, uid, modseq = slot
                slot[1], slot[2] = uid + 1, modseq + 1
                messages.append({
                    "mailbox_id": mailbox_id, "uid": uid, "modseq": modseq,
                    "flags": delivery.flags,
                    # UTC: SQLite keeps no offset, so one given as -0700 would come back shifted.
                    "internal_date": (delivery.internal_date or now).astimezone(UTC),
                    "size": len(delivery.raw), "blob_id": blob_id, "envelope": envelope,
                    "bodystructure": bodystructure, "body": body})
                events.append({
                    "created_at": now, "kind": delivery.event, "account_id": account_id,
                    "detail": json.dumps({**delivery.detail, "uid": uid,
                                          "mailbox": mailbox})})
                uids.append((account_id, uid))
            results.append(Delivered(blob_id, tuple(uids)))
        if messages:
            conn.execute(insert(t.messages), messages)
            conn.execute(insert(t.events), events)
        return results

    # --- IMAP ----------------------------------------------------------------------------
    def fetch_rows(self, mailbox_id: int, uids: list[int], with_raw: bool,
                   with_structure: bool) -> list[FetchRow]:
        """The stored facts about `uids` (that still exist), by UID."""
        columns = [t.messages.c.uid, t.messages.c.flags, t.messages.c.internal_date,
                   t.messages.c.size, t.messages.c.modseq]
        columns += ([t.messages.c.envelope, t.messages.c.bodystructure, t.messages.c.body]
                    if with_structure else [])
        query = select(*columns, *([t.blobs.c.data] if with_raw else []))
        if with_raw:
            query = query.select_from(t.messages.join(t.blobs))
        rows = []
        with self.db.read() as conn:
            for start in range(0, len(uids), 500):  # bounded IN lists
                chunk = uids[start:start + 500]
                rows += conn.execute(query.where(and_(t.messages.c.mailbox_id == mailbox_id,
                                                      _uid_filter(chunk)))
                                     .order_by(t.messages.c.uid)).all()
        wanted = set(uids)  # a range may hold UIDs nobody asked for
        rows = [row for row in rows if row[0] in wanted]
        out = []
        for row in rows:
            uid, flags, date, size, modseq = row[:5]
            structure = tuple(row[5:8]) if with_structure else None
            raw = row[-1] if with_raw else None
            out.append(FetchRow(uid, flags, as_utc(date), size, modseq, structure, raw))
        return out

    def message_blobs(self, mailbox_id: int, uids: list[int]) -> dict[int, bytes]:
        """The raw bytes of exactly these messages (those that still exist), by UID: unlike
        fetch_rows, never more, so a caller that budgets bytes gets what it budgeted for."""
        out: dict[int, bytes] = {}
        with self.db.read() as conn:
            for start in range(0, len(uids), 500):
                out.update(conn.execute(
                    select(t.messages.c.uid, t.blobs.c.data)
                    .select_from(t.messages.join(t.blobs))
                    .where(and_(t.messages.c.mailbox_id == mailbox_id,
                                t.messages.c.uid.in_(uids[start:start + 500])))).all())
        return out

    def set_structure(self, mailbox_id: int, uid: int,
                      structure: tuple[bytes, bytes, bytes]) -> None:
        """Fill in a message's cached IMAP structure (for messages stored without it)."""
        envelope, bodystructure, body = structure
        with self.db.write() as conn:
            conn.execute(update(t.messages).where(and_(t.messages.c.mailbox_id == mailbox_id,
                                                       t.messages.c.uid == uid))
                         .values(envelope=envelope, bodystructure=bodystructure, body=body))

    def store_flags(self, mailbox_id: int, uids: list[int], mode: str,
                    flags: list[str]) -> list[tuple[int, str]]:
        """mode "+", "-" or "=": returns (uid, new flags) of every message it changed."""
        changed: list[tuple[int, str]] = []
        wanted = list(dict.fromkeys(flags))
        with self.db.write() as conn:
            rows = []
            for start in range(0, len(uids), 500):
                rows += conn.execute(
                    select(t.messages.c.id, t.messages.c.uid, t.messages.c.flags)
                    .where(and_(t.messages.c.mailbox_id == mailbox_id,
                                t.messages.c.uid.in_(uids[start:start + 500])))
                    .order_by(t.messages.c.uid)).all()
            modseq = None
            for message_id, uid, current in rows:
                have = current.split()
                if mode == "+":
                    new = have + [f for f in wanted if f not in have]
                elif mode == "-":
                    new = [f for f in have if f not in wanted]
                else:
                    new = wanted
                text = " ".join(new)
                if text == current:
                    continue
                if modseq is None:
                    modseq = self._bump_modseq(conn, mailbox_id)
                conn.execute(update(t.messages).where(t.messages.c.id == message_id)
                             .values(flags=text, modseq=modseq))
                changed.append((uid, text))
            if changed:
                mark_changed(conn, mailbox_id)
        return changed

    def append(self, account_id: int, mailbox: str, raw: bytes, flags: str,
               internal_date: datetime | None,
               structure: tuple[bytes, bytes, bytes] | None) -> tuple[int, int]:
        """Store a message into one of the account's mailboxes: (uidvalidity, uid)."""
        with self.db.write() as conn:
            box = self._mailbox(conn, account_id, mailbox)
            [delivered] = self._deliver_all(conn, [Delivery(
                raw=raw, account_ids=(account_id,), detail={"via": "imap"}, event="appended",
                mailbox=mailbox, flags=flags, internal_date=internal_date,
                structure=structure)])
        return box.uidvalidity, delivered.uids[0][1]

    def copy_messages(self, mailbox_id: int, uids: list[int], account_id: int, target: str,
                      move: bool = False) -> tuple[int, list[tuple[int, int]]]:
        """Copy (or move) messages into another mailbox of the same account, sharing blobs.

        Returns (target uidvalidity, [(source uid, new uid)]).
        """
        pairs = []
        with self.db.write() as conn:
            box = self._mailbox(conn, account_id, target)
            rows = []
            for start in range(0, len(uids), 500):
                rows += conn.execute(
                    select(t.messages).where(and_(t.messages.c.mailbox_id == mailbox_id,
                                                  t.messages.c.uid.in_(uids[start:start + 500])))
                    .order_by(t.messages.c.uid)).all()
            for row in rows:
                new_uid, modseq = conn.execute(
                    update(t.mailboxes).where(t.mailboxes.c.id == box.id)
                    .values(uidnext=t.mailboxes.c.uidnext + 1,
                            highestmodseq=t.mailboxes.c.highestmodseq + 1)
                    .returning(t.mailboxes.c.uidnext - 1, t.mailboxes.c.highestmodseq)).one()
                conn.execute(insert(t.messages).values(
                    mailbox_id=box.id, uid=new_uid, modseq=modseq, flags=row.flags,
                    internal_date=row.internal_date, size=row.size, blob_id=row.blob_id,
                    envelope=row.envelope, bodystructure=row.bodystructure, body=row.body))
                pairs.append((row.uid, new_uid))
            if pairs:
                mark_changed(conn, box.id)
            if move and pairs:
                conn.execute(delete(t.messages).where(and_(
                    t.messages.c.mailbox_id == mailbox_id,
                    t.messages.c.uid.in_([uid for uid, _ in pairs]))))
                self._bump_modseq(conn, mailbox_id)
                mark_changed(conn, mailbox_id)
        return box.uidvalidity, pairs

    def expunge_deleted(self, mailbox_id: int, uids: list[int] | None = None) -> list[int]:
        r"""Remove messages flagged \Deleted (only those in `uids` when given)."""
        with self.db.write() as conn:
            rows = conn.execute(select(t.messages.c.uid, t.messages.c.flags, t.messages.c.blob_id)
                                .where(t.messages.c.mailbox_id == mailbox_id)).all()
            allowed = set(uids) if uids is not None else None
            gone = [(uid, blob) for uid, flags, blob in rows if "\\Deleted" in flags.split()
                    and (allowed is None or uid in allowed)]
            for start in range(0, len(gone), 500):
                conn.execute(delete(t.messages).where(and_(
                    t.messages.c.mailbox_id == mailbox_id,
                    t.messages.c.uid.in_([uid for uid, _ in gone[start:start + 500]]))))
            if gone:
                self._bump_modseq(conn, mailbox_id)
                self._drop_orphan_blobs(conn, {blob for _, blob in gone})
                mark_changed(conn, mailbox_id)
        return sorted(uid for uid, _ in gone)

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
                mark_changed(conn, box.id)
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
                mark_changed(conn, box.id)
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
        return [StoredMessage(uid, modseq, flags, as_utc(date), size, blob_id, raw)
                for uid, modseq, flags, date, size, blob_id, raw in rows]


def _uid_filter(chunk: list[int]) -> Any:
    """A dense run of UIDs as a range (an index range scan the planner always picks, even
    before ANALYZE has seen a bulk load); a sparse one as an IN list."""
    low, high = min(chunk), max(chunk)
    if high - low < 2 * len(chunk):
        return t.messages.c.uid.between(low, high)
    return t.messages.c.uid.in_(chunk)

