"""New mail and flag changes, announced to the sessions that watch a mailbox (IMAP IDLE).

Every store commit that changes a mailbox reports its id (store.engine.Database.on_change);
it reaches this process's watchers at once. On PostgreSQL the same commit also NOTIFYs, and a
listener thread here LISTENs, so watchers in other mailsuite processes wake up too.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from mailsuite.store.engine import CHANGE_CHANNEL

log = Logger(namespace="mailsuite.notify")


class Notifier:
    """In the reactor thread: mailbox id → callbacks to run when it changes."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._watchers: dict[int, set[Callable[[], None]]] = {}

    def watch(self, mailbox_id: int, callback: Callable[[], None]) -> None:
        self._watchers.setdefault(mailbox_id, set()).add(callback)

    def unwatch(self, mailbox_id: int, callback: Callable[[], None]) -> None:
        watchers = self._watchers.get(mailbox_id)
        if watchers is not None:
            watchers.discard(callback)
            if not watchers:
                del self._watchers[mailbox_id]

    def publish(self, mailbox_ids: Iterable[int]) -> None:
        for mailbox_id in mailbox_ids:
            for callback in list(self._watchers.get(mailbox_id, ())):
                try:
                    callback()
                except Exception:
                    log.failure("a mailbox watcher failed")

    def publish_from_thread(self, mailbox_ids: Iterable[int]) -> None:
        """Safe to call from any thread (the store calls it after commits)."""
        self.reactor.callFromThread(self.publish, list(mailbox_ids))


class PostgresListener:
    """A thread holding one LISTEN connection; notifications go to the Notifier."""

    def __init__(self, dsn: str, notifier: Notifier) -> None:
        self.dsn = dsn
        self.notifier = notifier
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mailsuite-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg2

        while not self._stop.is_set():
            try:
                conn = psycopg2.connect(self.dsn)
                conn.autocommit = True
                conn.cursor().execute(f"LISTEN {CHANGE_CHANNEL}")
                self._listen(conn)
            except Exception as exc:  # the database went away: try again shortly
                log.warn("LISTEN connection failed: {error}", error=str(exc))
                self._stop.wait(1.0)

    def _listen(self, conn: Any) -> None:
        try:
            while not self._stop.is_set():
                if select.select([conn], [], [], 0.5)[0]:
                    conn.poll()
                    ids: set[int] = set()
                    while conn.notifies:
                        payload = conn.notifies.pop(0).payload
                        ids.update(int(part) for part in payload.split(",") if part.isdigit())
                    if ids:
                        self.notifier.publish_from_thread(ids)
        finally:
            conn.close()
