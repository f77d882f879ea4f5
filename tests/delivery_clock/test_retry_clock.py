"""Retries on a simulated clock (RFC 5321 4.5.4.1): the queue runner takes its time from a
task.Clock while its connections, DNS lookups and store threads are real, so days of a retry
schedule pass in seconds and every attempt time can be checked exactly.

In process: a Store on SQLite behind an AsyncStore, a QueueRunner, a loopback DNS server
with an MX for the remote domain, and a receiving SMTP sink (tests/smtpsink.py) as that MX.
"""

from __future__ import annotations

import email
import email.policy
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from mailsuite.config import load_config
from mailsuite.resolver import make_resolver
from mailsuite.smtp.delivery import QueueRunner
from mailsuite.smtp.dsn import SUBJECT_EXPIRED
from mailsuite.store import AsyncStore, Outbound, Store, Submission, new_queue_id, open_store
from tests.dnsserver import DNSServerHandle, start_dns_server
from tests.smtpsink import SinkServer, free_port_on

SINK_HOST = "127.0.0.2"
REMOTE = "retry.test"
RECIPIENT = f"bob@{REMOTE}"
SCHEDULE = (timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2))  # then 2h on
EXPIRE_AFTER = timedelta(days=1)
DEFER = (451, "4.2.0 try later")
WAIT = 15.0  # real seconds any one step may take
MESSAGE = (b"From: Alice <alice@local.test>\r\nTo: <bob@retry.test>\r\n"
           b"Subject: on a schedule\r\nMessage-ID: <sched-1@local.test>\r\n\r\n"
           b"a message that waits\r\n")


def expected_attempts(start: datetime, expires: datetime) -> list[datetime]:
    """When a recipient that is always deferred gets tried: after each attempt the next
    delay of the schedule (its last one repeating), never later than the expiry time; the
    attempt at the expiry time is the last."""
    times = [start]
    while times[-1] < expires:
        delay = SCHEDULE[min(len(times) - 1, len(SCHEDULE) - 1)]
        times.append(min(expires, times[-1] + delay))
    return times


class RetryOnASimulatedClock(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="retry-clock-"))
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        self.store: Store = open_store(f"sqlite:///{workdir / 'mailsuite.db'}", pool_size=4)
        self.addCleanup(self.store.close)
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="retry-clock-store")
        self.pool.start()
        self.addCleanup(self.pool.stop)

        port = free_port_on([SINK_HOST])
        self.sink = SinkServer(SINK_HOST, port, rcpt_reply=lambda address: DEFER).start()
        self.addCleanup(self.sink.stop)
        self.dns: DNSServerHandle = start_dns_server({"records": {
            REMOTE: [{"type": "MX", "value": f"10 mx.{REMOTE}"}],
            f"mx.{REMOTE}": [{"type": "A", "value": SINK_HOST}],
        }}, workdir / "dns")
        self.addCleanup(self.dns.stop)

        config = load_config(None, environ={
            "MAILSUITE_SERVER_HOSTNAME": "mx.local.test",
            "MAILSUITE_DELIVERY_PORT": str(port),
            "MAILSUITE_DELIVERY_RETRY_SCHEDULE": "5m 30m 2h",
            "MAILSUITE_DELIVERY_EXPIRE_AFTER": "1d",
            "MAILSUITE_DNS_RESOLVER": self.dns.address,
        })
        self.clock = task.Clock()
        self.runner = QueueRunner(config, AsyncStore(self.store, self.pool, reactor),
                                  make_resolver(config), reactor, holder="test",
                                  clock=self.clock)

        self.store.domain_add("local.test")
        self.alice = "alice@local.test"
        self.alice_id = self.store.account_add(self.alice, "$2b$04$" + "x" * 53)

    @defer.inlineCallbacks
    def tearDown(self) -> Any:
        if self.runner.running:
            yield self.runner.stopService()
        # Give the reactor a moment to close what the runner's connections left half-closed.
        yield task.deferLater(reactor, 0.05, lambda: None)

    # --- helpers -------------------------------------------------------------------------
    def submit(self) -> tuple[str, datetime]:
        """Queue MESSAGE for RECIPIENT, returned to alice; start the clock at the wall time
        (created_at and the first next_attempt_at are wall-clock times) on a whole second,
        so that the clock's float seconds and the stored datetimes agree exactly."""
        queue_id = new_queue_id()
        [result] = self.store.submit_many([Submission(queue_id, None, Outbound(
            sender=self.alice, recipients=(RECIPIENT,), raw=MESSAGE, return_to=self.alice,
            account_id=self.alice_id))])
        self.assertEqual(result, queue_id)
        self.clock.advance(math.ceil(time.time()))
        return queue_id, self.store.queue_list(queue_id)[0].created_at

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def recipient(self, queue_id: str) -> tuple[str, int, datetime, str | None] | None:
        """(state, attempts, next attempt, last reply) of RECIPIENT, None once it is final."""
        entries = self.store.queue_list(queue_id)
        if not entries:
            return None
        [(_, *rest)] = entries[0].recipients
        return tuple(rest)  # type: ignore[return-value]

    def attempts_at_sink(self) -> int:
        return len(self.sink.rcpt_log)

    @defer.inlineCallbacks
    def settled(self, done: Callable[[], bool], what: str) -> Any:
        """Wait (real time) until done() holds and the runner is idle again: no connection
        open and no claim running, so its next poll waits on the simulated clock."""
        deadline = time.monotonic() + WAIT
        while not (done() and not self.runner.busy):
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}: connections="
                          f"{self.runner.connections}, pending calls="
                          f"{self.clock.getDelayedCalls()}, sink rcpts={self.sink.rcpt_log}, "
                          f"queue={self.store.queue_list()}")
            yield task.deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def advance_to(self, when: datetime, done: Callable[[], bool], what: str) -> Any:
        step = when.timestamp() - self.clock.seconds()
        self.assertGreaterEqual(step, 1.0)  # the runner polls every second: one tick runs
        self.clock.advance(step)
        yield self.settled(done, what)

    def attempt_times(self, queue_id: str) -> list[datetime]:
        """When each attempt was settled, by the runner's clock (events record its `now`)."""
        return [_utc(e.created_at) for e in self.store.events(limit=1000)
                if e.detail.get("queue_id") == queue_id
                and e.kind in ("deferred", "expired", "delivered", "bounced")]

    # --- tests ---------------------------------------------------------------------------
    @defer.inlineCallbacks
    def test_a_deferred_recipient_is_retried_on_the_schedule_until_it_expires_with_a_dsn(
            self) -> Any:
        queue_id, created = self.submit()
        start = self.now()
        expires = created + EXPIRE_AFTER
        self.runner.startService()
        self.clock.advance(0)
        yield self.settled(lambda: self.attempts_at_sink() == 1
                           and self.recipient(queue_id)[1] == 1, "the first attempt")
        self.assertEqual(self.recipient(queue_id),
                         ("deferred", 1, start + timedelta(minutes=5), "451 4.2.0 try later"))

        # Four minutes on, nothing is due: no connection is made.
        self.clock.advance(timedelta(minutes=4).total_seconds())
        yield self.settled(lambda: True, "an idle poll")
        self.assertEqual(self.attempts_at_sink(), 1)
        self.assertEqual(self.recipient(queue_id)[:2], ("deferred", 1))

        # At five minutes the second attempt; the next delay is 30 minutes.
        yield self.advance_to(start + timedelta(minutes=5),
                              lambda: self.recipient(queue_id)[1] == 2, "the second attempt")
        self.assertEqual(self.attempts_at_sink(), 2)
        self.assertEqual(self.recipient(queue_id),
                         ("deferred", 2, start + timedelta(minutes=35), "451 4.2.0 try later"))

        # Then every due time in turn, the sink still deferring, until the queue gives up.
        while (state := self.recipient(queue_id)) is not None:
            attempts, due = state[1], state[2]
            self.assertLessEqual(due, expires)
            yield self.advance_to(due, lambda n=attempts: self.recipient(queue_id) is None
                                  or self.recipient(queue_id)[1] == n + 1,
                                  f"attempt {attempts + 1}")

        planned = expected_attempts(start, expires)
        self.assertEqual(len(planned), 15)  # 0, 5m, 35m, then every 2h, then the expiry
        self.assertEqual(self.attempt_times(queue_id), planned)
        self.assertEqual(self.sink.rcpt_log, [(RECIPIENT, 451)] * len(planned))
        self.assertEqual(self.sink.messages, [])
        [expired] = self.store.events("expired")
        self.assertEqual(expired.detail["reply"], "451 4.2.0 try later")
        self.assertEqual(expired.detail["attempt"], len(planned))
        self.assertEqual(self.store.queue_size(), 0)

        # The DSN went to the local return_to's INBOX, and nothing went anywhere else.
        [dsn] = self.store.messages(self.alice)
        self.assertTrue(dsn.raw.startswith(b"Return-Path: <>\r\n"))
        message = email.message_from_bytes(dsn.raw, policy=email.policy.default)
        self.assertEqual(message["Subject"], SUBJECT_EXPIRED)
        self.assertEqual(message.get_content_type(), "multipart/report")
        report = [part for part in message.walk()
                  if part.get_content_type() == "message/delivery-status"][0]
        fields = {k.lower(): str(v) for block in report.get_payload() for k, v in block.items()}
        self.assertEqual(fields["final-recipient"], f"rfc822; {RECIPIENT}")
        self.assertEqual(fields["action"], "failed")
        self.assertEqual(fields["status"], "4.2.0")
        self.assertIn("451 4.2.0 try later", fields["diagnostic-code"])
        self.assertEqual(self.store.queue_list(), [])

        # Nothing more happens however long the clock runs.
        self.clock.advance(timedelta(days=3).total_seconds())
        yield self.settled(lambda: True, "an idle poll")
        self.assertEqual(self.attempts_at_sink(), len(planned))
        self.assertEqual(len(self.store.messages(self.alice)), 1)

    @defer.inlineCallbacks
    def test_a_recipient_accepted_at_the_third_attempt_is_delivered_exactly_once(
            self) -> Any:
        replies = [DEFER, DEFER]
        self.sink.rcpt_reply = lambda address: replies.pop(0) if replies else (250, "2.1.5 Ok")
        queue_id, _ = self.submit()
        start = self.now()
        self.runner.startService()
        self.clock.advance(0)
        yield self.settled(lambda: self.recipient(queue_id)[1] == 1, "the first attempt")
        yield self.advance_to(start + timedelta(minutes=5),
                              lambda: self.recipient(queue_id)[1] == 2, "the second attempt")
        self.assertEqual(self.recipient(queue_id),
                         ("deferred", 2, start + timedelta(minutes=35), "451 4.2.0 try later"))
        self.assertEqual(self.sink.messages, [])
        yield self.advance_to(start + timedelta(minutes=35),
                              lambda: self.recipient(queue_id) is None, "the third attempt")

        [received] = self.sink.messages
        self.assertEqual(received.mail_from, self.alice)
        self.assertEqual(received.rcpts, [RECIPIENT])
        self.assertEqual(received.data, MESSAGE)
        self.assertEqual(self.sink.rcpt_log, [(RECIPIENT, 451), (RECIPIENT, 451),
                                              (RECIPIENT, 250)])
        self.assertEqual(self.attempt_times(queue_id),
                         [start, start + timedelta(minutes=5), start + timedelta(minutes=35)])
        [delivered] = self.store.events("delivered")
        self.assertEqual((delivered.detail["recipient"], delivered.detail["attempt"]),
                         (RECIPIENT, 3))
        self.assertTrue(delivered.detail["reply"].startswith("250"))
        self.assertEqual(self.store.queue_list(), [])
        self.assertEqual(self.store.messages(self.alice), [])  # no DSN for a delivery

        # A day later there is still exactly one copy at the sink.
        self.clock.advance(timedelta(days=1).total_seconds())
        yield self.settled(lambda: True, "an idle poll")
        self.assertEqual(len(self.sink.messages), 1)
        self.assertEqual(len(self.sink.rcpt_log), 3)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
