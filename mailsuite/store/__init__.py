"""The mail store: every protocol reads and writes mail through this package only.

`Store` methods are blocking; the server calls them through `AsyncStore`, which runs them in
the store's thread pool so the reactor never waits on the database.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from mailsuite.store.apikeys import ApiKey, ApiKeysMixin
from mailsuite.store.directory import (
    NO_PASSWORD,
    AccountRow,
    AliasRow,
    DirectoryMixin,
    DomainRow,
    InboxRow,
    Resolution,
)
from mailsuite.store.engine import Database
from mailsuite.store.errors import Conflict, InUse, NotFound, StoreError
from mailsuite.store.events import Event, EventsMixin
from mailsuite.store.idempotency import Idempotency, IdempotencyMixin
from mailsuite.store.locks import LocksMixin
from mailsuite.store.mail import (
    Delivered,
    Delivery,
    FetchRow,
    Listing,
    MailMixin,
    StoredMessage,
)
from mailsuite.store.mailboxes import (
    MailboxChanges,
    MailboxesMixin,
    MailboxInfo,
    MailboxSnapshot,
    MailboxStatus,
    MailboxUsage,
)
from mailsuite.store.queue import (
    Job,
    Outbound,
    Outcome,
    QueuedRecipient,
    QueueEntry,
    QueueMixin,
    Settlement,
    Submission,
    new_queue_id,
)
from mailsuite.store.senders import SenderIdentities, SendersMixin, SigningKey

__all__ = [
    "AccountRow", "ApiKey", "AsyncStore", "Conflict", "Delivered", "Delivery", "Event",
    "FetchRow", "InUse", "DomainRow", "InboxRow", "MailboxUsage", "NO_PASSWORD",
    "Idempotency", "AliasRow",
    "Listing", "MailboxChanges", "MailboxInfo", "MailboxSnapshot", "MailboxStatus",
    "NotFound", "Resolution", "Store", "StoreError", "StoredMessage", "open_store",
    "Job", "Outbound", "Outcome", "QueuedRecipient", "QueueEntry", "Settlement", "Submission",
    "SenderIdentities", "SigningKey", "new_queue_id",
]


class Store(DirectoryMixin, MailMixin, MailboxesMixin, EventsMixin, LocksMixin, QueueMixin,
            SendersMixin, ApiKeysMixin, IdempotencyMixin):
    def __init__(self, db: Database) -> None:
        self.db = db

    def close(self) -> None:
        self.db.dispose()

    def ping(self) -> None:
        """Raises unless the database answers."""
        with self.db.read() as conn:
            conn.execute(text("SELECT 1"))


def open_store(url: str, pool_size: int = 8, migrate: bool = True) -> Store:
    """Connect, and bring the schema up to date (Alembic) unless told not to."""
    db = Database(url, pool_size=pool_size)
    if migrate:
        db.migrate()
    return Store(db)


class AsyncStore:
    """The same methods as Store, each returning a Deferred that fires in the reactor thread."""

    def __init__(self, store: Store, pool: ThreadPool, reactor: Any) -> None:
        self.store = store
        self.pool = pool
        self.reactor = reactor

    def __getattr__(self, name: str) -> Callable[..., defer.Deferred]:
        method = getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> defer.Deferred:
            return threads.deferToThreadPool(self.reactor, self.pool, method, *args, **kwargs)

        return call
