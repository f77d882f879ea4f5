"""The idle timer measures the client's silence only; a slow commit is waited for, and one past
the hard bound is rolled back before the 451 (issue 9, item 10).

The store is slowed for real: the test holds the database's write lock (SQLite: a
BEGIN IMMEDIATE transaction of its own; PostgreSQL: LOCK TABLE blobs) while the server
commits.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg2

from tests.harness import Mailsuite
from tests.smtp.test_mx_data import dot_stuff, open_data, session

IDLE = 1.0


@contextlib.contextmanager
def store_locked(server: Mailsuite, seconds: float) -> Iterator[None]:
    """Hold the store's write lock from now for `seconds` (released in the background)."""
    url = server.db_url
    conn: Any
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None,
                               check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")
    else:
        conn = psycopg2.connect(url)
        conn.cursor().execute("LOCK TABLE blobs IN EXCLUSIVE MODE")
    timer = threading.Timer(seconds, conn.rollback)
    timer.start()
    try:
        yield
    finally:
        timer.join()
        conn.close()


def send_while_locked(server: Mailsuite, rcpt: str, hold: float) -> tuple[int, str, float]:
    client = session(server)
    open_data(client, [rcpt])
    client.send(dot_stuff(b"Subject: slow store\r\n\r\nbody\r\n")[:-3])
    with store_locked(server, hold):
        started = time.monotonic()
        client.send(b".\r\n")
        code, text = client.reply()
        elapsed = time.monotonic() - started
        assert client.cmd("NOOP")[0] == 250  # the session goes on
    client.close()
    return code, text, elapsed


def test_slow_commit_is_answered_250_after_the_idle_timeout_and_stored_once(
        start_mailsuite: Any) -> None:
    server = start_mailsuite({"smtp": {"idle_timeout": IDLE, "commit_timeout": 30.0}})
    rcpt = server.new_account()
    code, text, elapsed = send_while_locked(server, rcpt, hold=IDLE * 3)
    # The server worked (waited for the lock) three times the idle timeout: no 421.
    assert code == 250, text
    assert elapsed >= IDLE * 2.5, elapsed
    assert len(server.inbox(rcpt)) == 1


def test_commit_past_the_bound_is_rolled_back_and_answered_451(start_mailsuite: Any) -> None:
    bound = 2.0
    server = start_mailsuite({"smtp": {"idle_timeout": IDLE, "commit_timeout": bound}})
    rcpt = server.new_account()
    code, text, elapsed = send_while_locked(server, rcpt, hold=bound + 4.0)
    assert (code, text[:5]) == (451, "4.3.0"), text
    assert bound - 0.2 <= elapsed < bound + 3.0, elapsed
    # The lock is gone now; the rolled-back message must not show up later.
    time.sleep(1.0)
    assert server.inbox(rcpt) == []
    # And the store works again: the retry is accepted, once.
    client = session(server)
    open_data(client, [rcpt])
    client.send(dot_stuff(b"Subject: retry\r\n\r\nbody\r\n"))
    assert client.reply()[0] == 250
    client.close()
    assert len(server.inbox(rcpt)) == 1
