"""Header limits and header syntax, decided while DATA streams in (issue 9, items 2 and 9)."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from tests.harness import Mailsuite
from tests.smtp.smtp_client import RawSMTP
from tests.smtp.test_mx_data import dot_stuff, open_data, session

MB = 1024 * 1024


def log_tail(server: Mailsuite, offset: int) -> str:
    return server.log()[offset:]


def rss(server: Mailsuite) -> int:
    """The server's resident set size in octets, from /proc."""
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


class PeakRSS:
    """Samples the server's RSS in the background; .growth is the peak above the start."""

    def __init__(self, server: Mailsuite) -> None:
        self.server = server
        self.start = self.peak = rss(server)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.server))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.server))
        return self.peak - self.start


def timed_end_of_data(server: Mailsuite, rcpt: str, message: bytes,
                      memory: PeakRSS | None = None) -> tuple[int, str, float]:
    """Send `message` in DATA; (code, text, seconds from the final dot to the reply)."""
    client = session(server)
    open_data(client, [rcpt])
    client.send(dot_stuff(message)[:-3])
    started = time.monotonic()
    client.send(b".\r\n")
    code, text = client.reply()
    elapsed = time.monotonic() - started
    if memory is not None:
        memory.stop()
    # The session goes on: the refusal ended the transaction, not the connection.
    assert client.cmd("NOOP")[0] == 250
    client.close()
    return code, text, elapsed


def folded_header(size: int) -> bytes:
    """One field of about `size` octets folded into minimal continuation lines: the shape
    that made header parsing quadratic."""
    return b"X-Folded: start\r\n" + b" x\r\n" * (size // 4)


def body() -> bytes:
    return b"Subject: limits\r\n\r\nbody\r\n"


@pytest.mark.parametrize("size", [8 * MB, 20 * MB], ids=["8MB", "20MB"])
def test_huge_folded_header_is_refused_552_at_once_and_not_stored(
        mailsuite: Mailsuite, size: int) -> None:
    rcpt = mailsuite.new_account()
    offset = len(mailsuite.log())
    message = folded_header(size) + body()
    memory = PeakRSS(mailsuite)
    code, text, elapsed = timed_end_of_data(mailsuite, rcpt, message, memory)
    assert (code, text[:5]) == (552, "5.3.4"), text
    assert "header" in text
    # Before the streaming check no reply came within minutes (dkimpy's quadratic parse).
    assert elapsed < 2.0, elapsed
    # What follows the violation is read, not kept: far less than the message is held.
    growth = memory.peak - memory.start
    assert growth < 5 * MB, (growth, size)
    assert mailsuite.inbox(rcpt) == []
    assert "Traceback" not in log_tail(mailsuite, offset)


def test_header_section_over_its_limit_is_refused_552(mailsuite: Mailsuite) -> None:
    # Fields each well under the field limit (100 KB), together over the section's (1 MB).
    fold = b" " + b"y" * 97 + b"\r\n"
    fields = b"".join(b"X-Filler-%d: f\r\n" % i + fold * 60 for i in range(200))
    assert 1.1 * MB < len(fields) < 1.2 * MB
    rcpt = mailsuite.new_account()
    message = fields + body()
    code, text, elapsed = timed_end_of_data(mailsuite, rcpt, message)
    assert (code, text[:5]) == (552, "5.3.4"), text
    assert "header is longer than 1048576" in text
    assert elapsed < 2.0
    assert mailsuite.inbox(rcpt) == []


def test_too_many_header_fields_are_refused_552(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    message = b"".join(b"X-N: %d\r\n" % i for i in range(1001)) + body()
    code, text, _ = timed_end_of_data(mailsuite, rcpt, message)
    assert (code, text[:5]) == (552, "5.3.4"), text
    assert "more than 1000 header fields" in text
    assert mailsuite.inbox(rcpt) == []


def test_header_just_within_the_limits_is_accepted_and_stored_whole(
        mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    field = b"X-Folded: start\r\n" + b" x\r\n" * ((102400 - 17) // 4)  # <= 102400 octets
    assert len(field) <= 102400
    others = b"".join(b"X-N: %d\r\n" % i for i in range(997))
    message = field + others + body()
    code, text, elapsed = timed_end_of_data(mailsuite, rcpt, message)
    assert code == 250, text
    assert elapsed < 10.0, elapsed
    [stored] = mailsuite.inbox(rcpt)
    assert stored.endswith(message)


# --- malformed header lines: a permanent 554 5.6.0, never 4xx, never a traceback -----------
MALFORMED = {
    "no colon": b"This line has no colon\r\nSubject: x\r\n\r\nbody\r\n",
    "NUL in name": b"Sub\x00ject: x\r\n\r\nbody\r\n",
    "space in name": b"Sub ject: x\r\n\r\nbody\r\n",
    "space before colon": b"Subject : x\r\n\r\nbody\r\n",
    "8-bit in name": "Süb: x\r\n\r\nbody\r\n".encode(),
    "control in name": b"Sub\x01ject: x\r\n\r\nbody\r\n",
    "first line folded": b" Subject: x\r\nFrom: <a@spf-pass.test>\r\n\r\nbody\r\n",
    "empty name": b": x\r\nSubject: y\r\n\r\nbody\r\n",
    "mbox From line": b"From sender@spf-pass.test Thu Jan  1 00:00:00 2026\r\n"
                      b"Subject: x\r\n\r\nbody\r\n",
    "bad line after good": b"Subject: x\r\nFrom: <a@spf-pass.test>\r\nnot a header\r\n\r\nb\r\n",
}


@pytest.mark.parametrize("message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_header_line_gets_554_5_6_0_and_nothing_stored(
        mailsuite: Mailsuite, message: bytes) -> None:
    rcpt = mailsuite.new_account()
    offset = len(mailsuite.log())
    client = session(mailsuite)
    open_data(client, [rcpt])
    client.send(dot_stuff(message))
    code, text = client.reply()
    assert (code, text[:5]) == (554, "5.6.0"), text
    assert "Malformed message header" in text
    # The same client may go on (a retry gets the same permanent answer).
    open_data(client, [rcpt])
    client.send(dot_stuff(message))
    assert client.reply()[0] == 554
    client.close()
    assert mailsuite.inbox(rcpt) == []
    assert "Traceback" not in log_tail(mailsuite, offset)


def test_a_line_after_the_blank_line_is_body_not_header(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    message = b"Subject: x\r\n\r\nno colon here\r\n x\r\nSub ject: y\r\n"
    client = session(mailsuite)
    open_data(client, [rcpt])
    client.send(dot_stuff(message))
    assert client.reply()[0] == 250
    client.close()
    [stored] = mailsuite.inbox(rcpt)
    assert stored.endswith(message)


def test_dot_stuffed_header_line_is_checked_as_unstuffed(mailsuite: Mailsuite) -> None:
    rcpt = mailsuite.new_account()
    message = b".X-Dotted: yes\r\nSubject: x\r\n\r\nbody\r\n"  # ".X-Dotted" is a legal name
    client = RawSMTP(mailsuite.mx)
    client.greeting()
    client.cmd("EHLO client.test")
    open_data(client, [rcpt])
    client.send(dot_stuff(message))
    assert client.reply()[0] == 250
    client.close()
    [stored] = mailsuite.inbox(rcpt)
    assert stored.endswith(message)
