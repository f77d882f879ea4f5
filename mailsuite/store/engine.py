"""Database engines for SQLite and PostgreSQL, transactions, and migrations at start."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, create_engine, event, func, select, text
from sqlalchemy.engine import make_url

# Any constant will do: it only has to be the same in every mailsuite process.
_MIGRATION_LOCK_KEY = 0x6D61696C  # "mail"
#: PostgreSQL NOTIFY channel carrying the ids of mailboxes whose contents changed
CHANGE_CHANNEL = "mailsuite_mailbox"
_CHANGED = "mailsuite_changed_mailboxes"
T = TypeVar("T")


def as_utc(value: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime: SQLite hands back naive ones, and everything
    we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def mark_changed(conn: Connection, mailbox_id: int) -> None:
    """Record that this transaction changes a mailbox, to announce once it commits."""
    conn.info.setdefault(_CHANGED, set()).add(mailbox_id)


class Database:
    """An engine plus the two kinds of transaction the store uses.

    SQLite allows one writer at a time: writes take BEGIN IMMEDIATE (so a transaction never
    fails half-way on a lock upgrade) under a process-wide lock (so our own threads queue here
    instead of spinning in SQLite's busy handler).
    """

    def __init__(self, url: str, pool_size: int = 8) -> None:
        parsed = make_url(url)
        if parsed.drivername == "postgresql":
            # SQLAlchemy 2.1 defaults to psycopg 3; we ship psycopg2.
            parsed = parsed.set(drivername="postgresql+psycopg2")
            url = parsed.render_as_string(hide_password=False)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self._write_lock = threading.Lock() if self.is_sqlite else None
        #: called (in the committing thread) with the ids of mailboxes a commit changed
        self.on_change: Callable[[set[int]], None] | None = None
        self.url = url
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(
                url,
                connect_args={"timeout": 30, "check_same_thread": False},
                pool_size=pool_size,
                max_overflow=0,
            )
            _configure_sqlite(self.engine)
        else:
            # No pre-ping: it costs a round trip per transaction; a connection the server
            # dropped fails its transaction (answered as a temporary error) and is replaced.
            self.engine = create_engine(
                url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800
            )

    @contextlib.contextmanager
    def write(self, deadline: float | None = None) -> Iterator[Connection]:
        """A transaction that commits on success and rolls back on any exception.

        With a deadline (time.monotonic()), waiting for locks and running statements past it
        raises and rolls back, so a caller that answers "failed" is never wrong.
        """
        with self._write_lock_until(deadline), self.engine.connect() as conn:
            conn = conn.execution_options(mailsuite_write=True)
            conn.info.pop(_CHANGED, None)
            try:
                with self._bounded(conn, deadline), conn.begin():
                    if deadline is not None and not self.is_sqlite:
                        # Each statement, lock waits included (transaction-local setting).
                        conn.execute(select(func.set_config(
                            "statement_timeout", str(_remaining_ms(deadline)), True)))
                    yield conn
                    changed = conn.info.get(_CHANGED)
                    if changed and not self.is_sqlite:
                        # Delivered by PostgreSQL at commit, to every process that listens.
                        payload = ",".join(str(i) for i in sorted(changed))
                        conn.execute(select(func.pg_notify(CHANGE_CHANNEL, payload)))
            finally:
                changed = conn.info.pop(_CHANGED, None)
        if changed and self.on_change is not None:
            self.on_change(changed)

    @contextlib.contextmanager
    def _write_lock_until(self, deadline: float | None) -> Iterator[None]:
        if self._write_lock is None:
            yield
            return
        wait = -1 if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self._write_lock.acquire(timeout=wait):
            raise TimeoutError("the write lock was not free before the deadline")
        try:
            yield
        finally:
            self._write_lock.release()

    @contextlib.contextmanager
    def _bounded(self, conn: Connection, deadline: float | None) -> Iterator[None]:
        """On SQLite, make lock waits and statements of this transaction end by `deadline`."""
        if deadline is None or not self.is_sqlite:
            yield
            return
        raw = conn.connection.dbapi_connection
        raw.execute(f"PRAGMA busy_timeout={_remaining_ms(deadline)}")
        raw.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        try:
            yield
        finally:
            raw.set_progress_handler(None, 0)
            raw.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")

    def write_batch(self, items: Sequence[T], run: Callable[[Connection, Sequence[T]], list[Any]],
                    timeout: float | None = None) -> list[Any]:
        """run(conn, items) in one transaction, one result per item; if that fails, each item
        in a transaction of its own, so one bad item never costs the others (its result is
        then its exception). A timeout bounds all of it: past it, the work is rolled back."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self.write(deadline) as conn:
                return run(conn, items)
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        results: list[Any] = []
        for item in items:
            try:
                with self.write(deadline) as conn:
                    results.extend(run(conn, [item]))
            except Exception as exc:
                results.append(exc)
        return results

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (a consistent snapshot on both databases)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def migrate(self) -> None:
        """Bring the schema to the newest revision; safe with several processes starting at once."""
        alembic_cfg = AlembicConfig()
        alembic_cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.connect() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                conn.commit()
            try:
                alembic_cfg.attributes["connection"] = conn
                command.upgrade(alembic_cfg, "head")
                conn.commit()
            finally:
                if not self.is_sqlite:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_KEY})
                    conn.commit()

    def dispose(self) -> None:
        self.engine.dispose()

    def libpq_dsn(self) -> str:
        """The PostgreSQL URL as psycopg2 takes it (for the LISTEN connection)."""
        return make_url(self.url).set(drivername="postgresql").render_as_string(
            hide_password=False)


def _remaining_ms(deadline: float) -> int:
    return max(int((deadline - time.monotonic()) * 1000), 1)


_BUSY_TIMEOUT_MS = 30000


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # Take transaction control from the sqlite3 module so BEGIN is ours (see "begin").
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("mailsuite_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
