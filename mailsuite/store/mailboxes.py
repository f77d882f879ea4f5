"""Mailboxes (folders) of an account, and the state an IMAP session keeps in sync with."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, case, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from mailsuite.store import schema as t
from mailsuite.store.engine import Database, mark_changed
from mailsuite.store.errors import Conflict, InUse, NotFound, StoreError

DELIMITER = "/"


@dataclass(frozen=True)
class MailboxInfo:
    id: int
    name: str
    special_use: str | None
    subscribed: bool


@dataclass(frozen=True)
class MailboxStatus:
    messages: int
    recent: int
    uidnext: int
    uidvalidity: int
    unseen: int
    highestmodseq: int


@dataclass(frozen=True)
class MailboxUsage:
    name: str
    special_use: str | None
    messages: int
    unread: int
    size: int


@dataclass(frozen=True)
class MailboxSnapshot:
    """Everything a SELECT needs: the messages in UID order with their flags."""

    id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: list[int]
    flags: list[str]
    recent: set[int]
    keywords: set[str]


@dataclass(frozen=True)
class MailboxChanges:
    """What changed since a session last looked (highestmodseq it knew)."""

    highestmodseq: int
    uids: list[int] | None  # every UID now present, when anything was added or removed
    flag_changes: list[tuple[int, str]]  # (uid, flags) of messages changed or added


def _valid_name(name: str) -> str:
    if (not name or name.startswith(DELIMITER) or name.endswith(DELIMITER)
            or f"{DELIMITER}{DELIMITER}" in name or len(name) > 900
            or any(ord(c) < 0x20 or c == "\x7f" for c in name)):
        raise StoreError(f"invalid mailbox name {name!r}")
    return "INBOX" if name.upper() == "INBOX" else name


def _has_flag(flag: str) -> Any:
    """A WHERE clause: the message's space-separated flags include `flag`."""
    flags = t.messages.c.flags
    return or_(flags == flag, flags.like(f"{flag} %", escape="!"),
               flags.like(f"% {flag}", escape="!"), flags.like(f"% {flag} %", escape="!"))


class MailboxesMixin:
    db: Database

    def mailbox_list(self, account_id: int) -> list[MailboxInfo]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(t.mailboxes.c.id, t.mailboxes.c.name, t.mailboxes.c.special_use)
                .where(t.mailboxes.c.account_id == account_id).order_by(t.mailboxes.c.name)
            ).all()
            subscribed = set(self._subscribed(conn, account_id))
        return [MailboxInfo(i, name, special, name in subscribed) for i, name, special in rows]

    def subscriptions(self, account_id: int) -> list[str]:
        """Subscribed names, whether or not such a mailbox exists now."""
        with self.db.read() as conn:
            return self._subscribed(conn, account_id)

    @staticmethod
    def _subscribed(conn: Connection, account_id: int) -> list[str]:
        return list(conn.scalars(select(t.subscriptions.c.name)
                                 .where(t.subscriptions.c.account_id == account_id)
                                 .order_by(t.subscriptions.c.name)))

    def mailbox_create(self, account_id: int, name: str) -> None:
        """Create `name`, and any missing parents (RFC 3501 6.3.3)."""
        name = _valid_name(name)
        parts = name.split(DELIMITER)
        try:
            with self.db.write() as conn:
                existing = set(conn.scalars(select(t.mailboxes.c.name)
                                            .where(t.mailboxes.c.account_id == account_id)))
                if name in existing:
                    raise Conflict(f"mailbox {name} exists already")
                for depth in range(1, len(parts) + 1):
                    path = DELIMITER.join(parts[:depth])
                    if path not in existing:
                        self._insert_mailbox(conn, account_id, path)
        except IntegrityError as exc:
            raise Conflict(f"mailbox {name} exists already") from exc

    @staticmethod
    def _insert_mailbox(conn: Connection, account_id: int, name: str,
                        special_use: str | None = None) -> None:
        # A new UIDVALIDITY each time, so a mailbox recreated under an old name is new to
        # every client (RFC 3501 2.3.1.1): larger than any this account ever used.
        now = int(time.time()) & 0x7FFFFFFF
        last = t.accounts.c.last_uidvalidity
        uidvalidity = conn.execute(
            update(t.accounts).where(t.accounts.c.id == account_id)
            .values(last_uidvalidity=case((last + 1 > now, last + 1), else_=now))
            .returning(t.accounts.c.last_uidvalidity)).scalar_one()
        conn.execute(insert(t.mailboxes).values(
            account_id=account_id, name=name, special_use=special_use,
            uidvalidity=uidvalidity, uidnext=1, highestmodseq=1, recent_uid=0))

    def mailbox_delete(self, account_id: int, name: str) -> list[int]:
        """Delete a mailbox and its messages; returns the blob ids it referred to."""
        name = _valid_name(name)
        if name == "INBOX":
            raise StoreError("INBOX cannot be deleted")
        with self.db.write() as conn:
            box_id = self._mailbox(conn, account_id, name).id  # type: ignore[attr-defined]
            children = conn.scalar(select(func.count()).where(and_(
                t.mailboxes.c.account_id == account_id,
                t.mailboxes.c.name.startswith(name + DELIMITER, autoescape=True))))
            if children:
                # As Dovecot does: the alternative, a \Noselect name, leaves a folder that
                # clients show but cannot use.
                raise InUse(f"mailbox {name} has children; delete them first")
            blob_ids = set(conn.scalars(select(t.messages.c.blob_id)
                                        .where(t.messages.c.mailbox_id == box_id)))
            conn.execute(delete(t.messages).where(t.messages.c.mailbox_id == box_id))
            conn.execute(delete(t.mailboxes).where(t.mailboxes.c.id == box_id))
            self._drop_orphan_blobs(conn, blob_ids)  # type: ignore[attr-defined]
            mark_changed(conn, box_id)
        return sorted(blob_ids)

    def mailbox_rename(self, account_id: int, old: str, new: str) -> None:
        """Rename a mailbox with its children; renaming INBOX moves its messages (6.3.5)."""
        old, new = _valid_name(old), _valid_name(new)
        if new == "INBOX":
            raise Conflict("mailbox INBOX exists already")
        try:
            with self.db.write() as conn:
                box_id = self._mailbox(conn, account_id, old).id  # type: ignore[attr-defined]
                names = set(conn.scalars(select(t.mailboxes.c.name)
                                         .where(t.mailboxes.c.account_id == account_id)))
                if new in names:
                    raise Conflict(f"mailbox {new} exists already")
                if new.startswith(old + DELIMITER):
                    raise StoreError("a mailbox cannot be moved inside itself")
                parts = new.split(DELIMITER)
                for depth in range(1, len(parts)):
                    parent = DELIMITER.join(parts[:depth])
                    if parent not in names:
                        self._insert_mailbox(conn, account_id, parent)
                if old == "INBOX":
                    self._insert_mailbox(conn, account_id, new)
                    target = self._mailbox(conn, account_id, new).id  # type: ignore[attr-defined]
                    self._move_all(conn, box_id, target)
                    return
                conn.execute(update(t.mailboxes).where(t.mailboxes.c.id == box_id)
                             .values(name=new))
                for child in sorted(n for n in names if n.startswith(old + DELIMITER)):
                    conn.execute(
                        update(t.mailboxes)
                        .where(and_(t.mailboxes.c.account_id == account_id,
                                    t.mailboxes.c.name == child))
                        .values(name=new + child[len(old):]))
        except IntegrityError as exc:
            raise Conflict(f"mailbox {new} exists already") from exc

    @staticmethod
    def _move_all(conn: Connection, source: int, target: int) -> None:
        uids = conn.scalars(select(t.messages.c.uid).where(t.messages.c.mailbox_id == source)
                            .order_by(t.messages.c.uid)).all()
        for uid in uids:
            new_uid, modseq = conn.execute(
                update(t.mailboxes).where(t.mailboxes.c.id == target)
                .values(uidnext=t.mailboxes.c.uidnext + 1,
                        highestmodseq=t.mailboxes.c.highestmodseq + 1)
                .returning(t.mailboxes.c.uidnext - 1, t.mailboxes.c.highestmodseq)).one()
            conn.execute(update(t.messages)
                         .where(and_(t.messages.c.mailbox_id == source, t.messages.c.uid == uid))
                         .values(mailbox_id=target, uid=new_uid, modseq=modseq))
        if uids:
            conn.execute(update(t.mailboxes).where(t.mailboxes.c.id == source)
                         .values(highestmodseq=t.mailboxes.c.highestmodseq + 1))
            mark_changed(conn, source)
            mark_changed(conn, target)

    def mailbox_subscribe(self, account_id: int, name: str, subscribed: bool) -> None:
        name = _valid_name(name)
        where = and_(t.subscriptions.c.account_id == account_id, t.subscriptions.c.name == name)
        with self.db.write() as conn:
            present = conn.scalar(select(t.subscriptions.c.name).where(where)) is not None
            if subscribed and not present:
                conn.execute(insert(t.subscriptions).values(account_id=account_id, name=name))
            elif not subscribed:
                if not present:
                    raise NotFound(f"not subscribed to {name}")
                conn.execute(delete(t.subscriptions).where(where))

    def mailbox_usage(self, account_id: int) -> list[MailboxUsage]:
        """Every mailbox of an account with its message count, unread count and bytes."""
        seen = _has_flag("\\Seen")
        query = (
            select(t.mailboxes.c.name, t.mailboxes.c.special_use, func.count(t.messages.c.id),
                   func.count(t.messages.c.id).filter(~seen),
                   func.coalesce(func.sum(t.messages.c.size), 0))
            .select_from(t.mailboxes.outerjoin(t.messages))
            .where(t.mailboxes.c.account_id == account_id)
            .group_by(t.mailboxes.c.id, t.mailboxes.c.name, t.mailboxes.c.special_use)
            .order_by(t.mailboxes.c.id))
        with self.db.read() as conn:
            return [MailboxUsage(*row) for row in conn.execute(query)]

    def mailbox_status(self, account_id: int, name: str) -> MailboxStatus:
        name = _valid_name(name)
        with self.db.read() as conn:
            box = conn.execute(
                select(t.mailboxes).where(and_(t.mailboxes.c.account_id == account_id,
                                               t.mailboxes.c.name == name))).first()
            if box is None:
                raise NotFound(f"no mailbox {name}")
            counts = conn.execute(
                select(func.count(), func.count().filter(t.messages.c.uid > box.recent_uid))
                .where(t.messages.c.mailbox_id == box.id)).one()
            seen = conn.scalar(select(func.count()).where(and_(
                t.messages.c.mailbox_id == box.id, _has_flag("\\Seen"))))
        return MailboxStatus(messages=counts[0], recent=counts[1], uidnext=box.uidnext,
                             uidvalidity=box.uidvalidity, unseen=counts[0] - seen,
                             highestmodseq=box.highestmodseq)

    def mailbox_select(self, account_id: int, name: str, claim_recent: bool) -> MailboxSnapshot:
        """The mailbox's state; with claim_recent, this session takes the \\Recent messages."""
        name = _valid_name(name)
        with self.db.write() if claim_recent else self.db.read() as conn:
            box = conn.execute(
                select(t.mailboxes).where(and_(t.mailboxes.c.account_id == account_id,
                                               t.mailboxes.c.name == name))).first()
            if box is None:
                raise NotFound(f"no mailbox {name}")
            rows = conn.execute(
                select(t.messages.c.uid, t.messages.c.flags)
                .where(t.messages.c.mailbox_id == box.id).order_by(t.messages.c.uid)).all()
            recent = {uid for uid, _ in rows if uid > box.recent_uid}
            if claim_recent and recent:
                conn.execute(update(t.mailboxes).where(t.mailboxes.c.id == box.id)
                             .values(recent_uid=max(recent)))
        keywords = {flag for _, flags in rows for flag in flags.split()
                    if not flag.startswith("\\")}
        return MailboxSnapshot(
            id=box.id, name=box.name, uidvalidity=box.uidvalidity, uidnext=box.uidnext,
            highestmodseq=box.highestmodseq, uids=[uid for uid, _ in rows],
            flags=[flags for _, flags in rows], recent=recent, keywords=keywords)

    def mailbox_changes(self, mailbox_id: int, known_modseq: int,
                        known_count: int, known_uidnext: int) -> MailboxChanges | None:
        """None when nothing changed; else what a session must be told."""
        with self.db.read() as conn:
            box = conn.execute(select(t.mailboxes.c.highestmodseq, t.mailboxes.c.uidnext)
                               .where(t.mailboxes.c.id == mailbox_id)).first()
            if box is None or box.highestmodseq == known_modseq:
                return None
            # New messages come too: the session needs their flags as much as the changes.
            flag_rows = conn.execute(
                select(t.messages.c.uid, t.messages.c.flags)
                .where(and_(t.messages.c.mailbox_id == mailbox_id,
                            t.messages.c.modseq > known_modseq))
                .order_by(t.messages.c.uid)).all()
            count = conn.scalar(select(func.count())
                                .where(t.messages.c.mailbox_id == mailbox_id))
            uids = None
            if count != known_count or box.uidnext != known_uidnext:
                uids = list(conn.scalars(select(t.messages.c.uid)
                                         .where(t.messages.c.mailbox_id == mailbox_id)
                                         .order_by(t.messages.c.uid)))
        return MailboxChanges(box.highestmodseq, uids, [(uid, f) for uid, f in flag_rows])
