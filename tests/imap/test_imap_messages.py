"""IMAP messages against the running service: SELECT and EXAMINE (RFC 3501 6.3.1-6.3.2),
FETCH with every section form, ENVELOPE and BODYSTRUCTURE (6.4.5, 7.4.2), STORE (6.4.6),
SEARCH (6.4.4), COPY, MOVE (RFC 6851) and UIDPLUS (RFC 4315), EXPUNGE, CLOSE and UNSELECT
(RFC 3691), APPEND (6.3.11), UIDs (2.3.1.1) and what one session learns of another's changes
(7.4.1, 5.5).
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.harness import Mailsuite
from tests.imap.test_imap_session import (
    Atom,
    Reply,
    Wire,
    deliver,
    fetch_results,
    make_message,
    session,
)

SYSTEM_FLAGS = {"\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"}

# --------------------------------------------------------------------------- a MIME message
# multipart/mixed
#   1    multipart/alternative
#   1.1    text/plain (quoted-printable)
#   1.2    text/html
#   2    application/octet-stream attachment (base64)
HEADER = (b"From: Alice Example <alice@spf-pass.test>\r\n"
          b"To: Bob <bob@example.test>, carol@example.test\r\n"
          b"Cc: Dave <dave@example.test>\r\n"
          b"Subject: Quarterly numbers\r\n"
          b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
          b"Message-ID: <q1@example.test>\r\n"
          b"In-Reply-To: <q0@example.test>\r\n"
          b"X-Mailer: pytest\r\n"
          b"MIME-Version: 1.0\r\n"
          b'Content-Type: multipart/mixed; boundary="outer"\r\n'
          b"\r\n")
ALT_HEADER = b'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
PLAIN_HEADER = (b"Content-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: quoted-printable\r\n\r\n")
PLAIN = b"Gr=C3=BC=C3=9Fe, Bob.\r\nThe numbers are attached.\r\n"
HTML_HEADER = b"Content-Type: text/html; charset=utf-8\r\n\r\n"
HTML = b"<p>Gr&uuml;&szlig;e, Bob.</p>\r\n<p>The numbers are attached.</p>\r\n"
ATTACHMENT_HEADER = (b'Content-Type: application/octet-stream; name="numbers.bin"\r\n'
                     b"Content-Transfer-Encoding: base64\r\n"
                     b'Content-Disposition: attachment; filename="numbers.bin"\r\n\r\n')
ATTACHMENT = base64.b64encode(bytes(range(120))) + b"\r\n"
ALT_BODY = (b"--inner\r\n" + PLAIN_HEADER + PLAIN + b"\r\n--inner\r\n" + HTML_HEADER + HTML
            + b"\r\n--inner--")
TEXT = (b"This is a multi-part message in MIME format.\r\n"
        b"--outer\r\n" + ALT_HEADER + ALT_BODY + b"\r\n--outer\r\n" + ATTACHMENT_HEADER
        + ATTACHMENT + b"\r\n--outer--\r\n")
MULTIPART = HEADER + TEXT


# --------------------------------------------------------------------------- helpers
def normalized(value: Any) -> Any:
    """Response data with case-insensitive strings upper-cased and numbers as int."""
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, Atom):
        return int(value) if value.isdigit() else value.upper()
    if isinstance(value, bytes):
        return value.upper()
    return value


def flags_of(values: dict[str, Any]) -> set[str]:
    return {str(flag) for flag in values["FLAGS"]}


def one(client: Wire, what: str, items: str, uid: bool = False) -> dict[str, Any]:
    """The FETCH data of one message."""
    fetched = client.fetch(what, items, uid=uid)
    assert len(fetched) == 1, fetched
    return next(iter(fetched.values()))


def expunged(reply: Reply) -> list[int]:
    return [int(line.split()[1]) for line in reply.lines("EXPUNGE")]


def apply_expunges(uids: list[int], reply: Reply) -> list[int]:
    """What a client's view of the mailbox becomes after the reply's EXPUNGE responses."""
    uids = list(uids)
    for number in expunged(reply):
        del uids[number - 1]
    return uids


def uid_set(text: str) -> list[int]:
    """The UIDs of a uid-set such as "4:6,9" (no "*")."""
    out: list[int] = []
    for item in text.split(","):
        first, _, last = item.partition(":")
        low, high = sorted((int(first), int(last or first)))
        out.extend(range(low, high + 1))
    return out


def all_uids(client: Wire) -> list[int]:
    reply = client.ok("UID SEARCH ALL")
    [line] = reply.lines("SEARCH")
    return [int(n) for n in line.split()[2:]]


def search(client: Wire, criteria: str | bytes, uid: bool = False) -> list[int]:
    prefix = b"UID SEARCH " if uid else b"SEARCH "
    reply = client.ok(prefix + (criteria.encode() if isinstance(criteria, str) else criteria))
    [line] = reply.lines("SEARCH")
    return sorted(int(n) for n in line.split()[2:])


def select_lines(reply: Reply) -> dict[str, Any]:
    """The facts of a SELECT/EXAMINE reply."""
    facts: dict[str, Any] = {}
    for line in reply.untagged:
        text = line.decode()
        if m := re.fullmatch(r"\* FLAGS \((.*)\)", text):
            facts["FLAGS"] = set(m.group(1).split())
        elif m := re.fullmatch(r"\* (\d+) (EXISTS|RECENT)", text):
            facts[m.group(2)] = int(m.group(1))
        elif m := re.fullmatch(r"\* OK \[(UNSEEN|UIDVALIDITY|UIDNEXT) (\d+)\].*", text):
            facts[m.group(1)] = int(m.group(2))
        elif m := re.fullmatch(r"\* OK \[PERMANENTFLAGS \((.*)\)\].*", text):
            facts["PERMANENTFLAGS"] = set(m.group(1).split())
        else:
            facts.setdefault("other", []).append(text)
    facts["access"] = reply.code
    return facts


# =========================================================================== SELECT / EXAMINE
def test_select_reports_flags_exists_recent_unseen_uidvalidity_uidnext_and_read_write(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        uidvalidity, first = client.append("INBOX", make_message("seen"), flags="\\Seen")
        _, second = client.append("INBOX", make_message("new"), flags="$Label1")
        facts = select_lines(client.ok("SELECT INBOX"))
    assert facts == {
        "FLAGS": SYSTEM_FLAGS | {"$Label1"}, "EXISTS": 2, "RECENT": 2, "UNSEEN": 2,
        "UIDVALIDITY": uidvalidity, "UIDNEXT": second + 1,
        "PERMANENTFLAGS": SYSTEM_FLAGS | {"\\*"}, "access": "READ-WRITE"}
    assert first < second


def test_examine_is_read_only_and_leaves_recent_to_the_next_select(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        uidvalidity, uid = client.append("INBOX", make_message())
        facts = select_lines(client.ok("EXAMINE INBOX"))
        assert facts["access"] == "READ-ONLY"
        assert facts["PERMANENTFLAGS"] == set()  # nothing can be stored
        assert (facts["EXISTS"], facts["RECENT"], facts["UIDVALIDITY"], facts["UIDNEXT"]) == (
            1, 1, uidvalidity, uid + 1)
        reply = client.command("STORE 1 +FLAGS (\\Flagged)")
        assert reply.status == "NO", reply
        assert client.command("EXPUNGE").status == "NO"
        client.ok("FETCH 1 BODY[]")  # no \Seen in a read-only mailbox (RFC 3501 6.3.2)
        assert "\\Seen" not in flags_of(one(client, "1", "FLAGS"))
        first = select_lines(client.ok("SELECT INBOX"))  # the first SELECT takes \Recent
        assert first["RECENT"] == 1 and first["access"] == "READ-WRITE"
    with session(mailsuite, address) as client:
        assert select_lines(client.ok("SELECT INBOX"))["RECENT"] == 0


def test_select_of_a_missing_mailbox_is_no_and_leaves_nothing_selected(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.append("INBOX", make_message())
        client.ok("SELECT INBOX")
        assert client.command("SELECT Nowhere").status == "NO"
        assert client.command("FETCH 1 FLAGS").status == "BAD"  # RFC 3501 6.3.1


# =========================================================================== FETCH
def test_mail_through_the_mx_reads_back_byte_exact_with_body_and_rfc822(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    raw = make_message("exact bytes", body=(
        b".a line that starts with a dot\r\n"
        b"\xc3\xa4\xc3\xb6\xc3\xbc 8-bit text\r\n"
        + b"x" * 900 + b"\r\n"
        b"\ttab and trailing space \r\n"
        b"..\r\n"))
    stored = deliver(mailsuite, address, raw)
    with session(mailsuite, address) as client:
        client.ok("SELECT INBOX")
        values = one(client, "1", "(BODY.PEEK[] RFC822.SIZE)")
        assert values["BODY[]"] == stored
        assert int(values["RFC822.SIZE"]) == len(stored)
        values = one(client, "1", "(RFC822 RFC822.HEADER RFC822.TEXT)")
        assert values["RFC822"] == stored
        header, _, text = stored.partition(b"\r\n\r\n")
        assert values["RFC822.HEADER"] == header + b"\r\n\r\n"
        assert values["RFC822.TEXT"] == text


def test_body_peek_leaves_seen_alone_and_body_sets_it(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        for i in range(3):
            client.append("INBOX", make_message(f"m{i}"))
        client.ok("SELECT INBOX")
        client.fetch("1", "(BODY.PEEK[] BODY.PEEK[TEXT] RFC822.HEADER RFC822.SIZE)")
        assert "\\Seen" not in flags_of(one(client, "1", "FLAGS"))
        client.fetch("2", "BODY[TEXT]")
        client.fetch("3", "RFC822")
        fetched = client.fetch("1:3", "FLAGS")
        assert ["\\Seen" in flags_of(fetched[n]) for n in (1, 2, 3)] == [False, True, True]
    with session(mailsuite, address) as client:  # it was stored, not only shown
        client.ok("EXAMINE INBOX")
        fetched = client.fetch("1:3", "FLAGS")
        assert ["\\Seen" in flags_of(fetched[n]) for n in (1, 2, 3)] == [False, True, True]


def test_every_body_section_form_gives_the_exact_octets(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    header_fields = (b"From: Alice Example <alice@spf-pass.test>\r\n"
                     b"Subject: Quarterly numbers\r\n\r\n")
    header_rest = (b"".join(line + b"\r\n" for line in HEADER.split(b"\r\n")
                            if line and not line.startswith((b"From:", b"Subject:")))
                   + b"\r\n")
    expected = {
        "": MULTIPART,
        "HEADER": HEADER,
        "TEXT": TEXT,
        "HEADER.FIELDS (Subject From)": header_fields,
        "HEADER.FIELDS.NOT (Subject From)": header_rest,
        "1": ALT_BODY,
        "1.MIME": ALT_HEADER,
        "1.1": PLAIN,
        "1.1.MIME": PLAIN_HEADER,
        "1.2": HTML,
        "1.2.MIME": HTML_HEADER,
        "2": ATTACHMENT,
        "2.MIME": ATTACHMENT_HEADER,
    }
    with session(mailsuite, address) as client:
        client.append("INBOX", MULTIPART)
        client.ok("SELECT INBOX")
        for section, octets in expected.items():
            values = one(client, "1", f"BODY.PEEK[{section}]")
            [(name, value)] = values.items()
            assert name.upper() == f"BODY[{section}]".upper(), (section, name)
            assert value == octets, section
        values = one(client, "1", "(BODY.PEEK[]<0.10> BODY.PEEK[TEXT]<5.20>)")
        assert values["BODY[]<0>"] == MULTIPART[:10]
        assert values["BODY[TEXT]<5>"] == TEXT[5:25]
        end = len(MULTIPART)
        values = one(client, "1", f"BODY.PEEK[]<{end - 4}.100>")
        assert values[f"BODY[]<{end - 4}>"] == MULTIPART[-4:]
        values = one(client, "1", f"BODY.PEEK[]<{end + 10}.5>")
        assert values[f"BODY[]<{end + 10}>"] == b""
        # A part that is not there is empty, not an error.
        assert one(client, "1", "BODY.PEEK[3]")["BODY[3]"] in (b"", None)
        assert "\\Seen" not in flags_of(one(client, "1", "FLAGS"))


def test_envelope_and_bodystructure_of_a_nested_multipart_message(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.append("INBOX", MULTIPART)
        client.ok("SELECT INBOX")
        values = one(client, "1", "(ENVELOPE BODYSTRUCTURE BODY)")
    alice = [b"Alice Example", None, b"alice", b"spf-pass.test"]
    assert values["ENVELOPE"] == [
        b"Mon, 7 Feb 1994 21:52:25 -0800", b"Quarterly numbers",
        [alice], [alice], [alice],  # from, and sender and reply-to default to it
        [[b"Bob", None, b"bob", b"example.test"], [None, None, b"carol", b"example.test"]],
        [[b"Dave", None, b"dave", b"example.test"]], None,
        b"<q0@example.test>", b"<q1@example.test>"]
    plain = [b"TEXT", b"PLAIN", [b"CHARSET", b"UTF-8"], None, None, b"QUOTED-PRINTABLE",
             len(PLAIN), PLAIN.count(b"\n")]
    html = [b"TEXT", b"HTML", [b"CHARSET", b"UTF-8"], None, None, b"7BIT", len(HTML),
            HTML.count(b"\n")]
    attachment = [b"APPLICATION", b"OCTET-STREAM", [b"NAME", b"NUMBERS.BIN"], None, None,
                  b"BASE64", len(ATTACHMENT)]
    # BODYSTRUCTURE: with the extension data (RFC 3501 7.4.2).
    assert normalized(values["BODYSTRUCTURE"]) == [
        [plain + [None, None, None, None], html + [None, None, None, None],
         b"ALTERNATIVE", [b"BOUNDARY", b"INNER"], None, None, None],
        attachment + [None, [b"ATTACHMENT", [b"FILENAME", b"NUMBERS.BIN"]], None, None],
        b"MIXED", [b"BOUNDARY", b"OUTER"], None, None, None]
    # BODY: the same without extension data.
    assert normalized(values["BODY"]) == [[plain, html, b"ALTERNATIVE"], attachment, b"MIXED"]


def test_fetch_macros_all_fast_and_full_expand_to_their_items(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.append("INBOX", MULTIPART)
        client.ok("SELECT INBOX")
        assert set(one(client, "1", "FAST")) == {"FLAGS", "INTERNALDATE", "RFC822.SIZE"}
        assert set(one(client, "1", "ALL")) == {"FLAGS", "INTERNALDATE", "RFC822.SIZE",
                                                "ENVELOPE"}
        full = one(client, "1", "FULL")
        assert set(full) == {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"}
        assert int(full["RFC822.SIZE"]) == len(MULTIPART)
        assert full["ENVELOPE"][1] == b"Quarterly numbers"
        assert "\\Seen" not in flags_of(one(client, "1", "FLAGS"))  # no macro sets \Seen
        assert client.command("FETCH 1 (FAST UID)").status == "BAD"  # macros stand alone


def test_internaldate_is_the_append_date_and_rfc822_size_the_stored_length(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    raw = make_message("dated")
    with session(mailsuite, address) as client:
        _, uid = client.append("INBOX", raw, date="17-Jul-1996 02:44:25 -0700")
        before = datetime.now(UTC)
        stored = deliver(mailsuite, address, make_message("now"))
        client.ok("SELECT INBOX")
        fetched = client.fetch("1:2", "(INTERNALDATE RFC822.SIZE)")
    dated = datetime.strptime(fetched[1]["INTERNALDATE"].decode(), "%d-%b-%Y %H:%M:%S %z")
    assert dated == datetime(1996, 7, 17, 9, 44, 25, tzinfo=UTC)  # the same instant
    assert int(fetched[1]["RFC822.SIZE"]) == len(raw)
    now = datetime.strptime(fetched[2]["INTERNALDATE"].decode(), "%d-%b-%Y %H:%M:%S %z")
    assert before - timedelta(seconds=60) <= now <= before + timedelta(seconds=60)
    assert int(fetched[2]["RFC822.SIZE"]) == len(stored)


def test_uid_fetch_always_includes_the_uid_and_ignores_missing_uids(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        _, uid = client.append("INBOX", make_message())
        client.ok("SELECT INBOX")
        assert one(client, str(uid), "FLAGS", uid=True)["UID"] == str(uid)
        assert client.fetch(f"{uid + 1}:{uid + 100}", "FLAGS", uid=True) == {}
        assert client.fetch("*", "UID", uid=True)[1]["UID"] == str(uid)


def test_sequence_numbers_out_of_range_are_bad(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.append("INBOX", make_message())
        client.append("INBOX", make_message())
        client.ok("SELECT INBOX")
        for command in ("FETCH 3 FLAGS", "FETCH 1:5 FLAGS", "FETCH 0 FLAGS",
                        "STORE 3 +FLAGS (\\Seen)", "STORE 1:3 +FLAGS (\\Seen)",
                        "COPY 2:3 Archive", "FETCH 4294967296 UID", "MOVE 3 Archive"):
            reply = client.command(command)
            assert reply.status == "BAD", (command, reply)
        assert search(client, "ALL") == [1, 2]
        assert all("\\Seen" not in flags_of(v) for v in client.fetch("1:*", "FLAGS").values())


# =========================================================================== STORE
def test_store_replaces_adds_and_removes_flags_and_keywords(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        _, uid = client.append("INBOX", make_message())
        client.ok("SELECT INBOX")

        def stored(command: str) -> set[str]:
            """The flags in the one untagged FETCH the STORE answers with."""
            reply = client.ok(command)
            [values] = fetch_results(reply).values()
            assert len(reply.lines("FETCH")) == 1, reply
            return flags_of(values) - {"\\Recent"}

        assert stored("STORE 1 FLAGS (\\Flagged $Important)") == {"\\Flagged", "$Important"}
        assert stored("STORE 1 +FLAGS (\\Seen work)") == {"\\Flagged", "$Important", "\\Seen",
                                                         "work"}
        assert stored("STORE 1 -FLAGS ($Important \\Flagged)") == {"\\Seen", "work"}
        assert stored("STORE 1 FLAGS \\Answered") == {"\\Answered"}
        assert stored("STORE 1 +FLAGS (\\Recent)") == {"\\Answered"}  # not for clients
        reply = client.ok(f"UID STORE {uid} +FLAGS (\\Draft)")
        assert fetch_results(reply)[1]["UID"] == str(uid)  # RFC 3501 6.4.8
        for command in ("STORE 1 +FLAGS.SILENT (\\Deleted)", "STORE 1 -FLAGS.SILENT (\\Draft)",
                        f"UID STORE {uid} +FLAGS.SILENT (later)"):
            assert client.ok(command).lines("FETCH") == [], command
        assert flags_of(one(client, "1", "FLAGS")) - {"\\Recent"} == {
            "\\Answered", "\\Deleted", "later"}
    with session(mailsuite, address) as client:  # kept, and the keywords are announced
        facts = select_lines(client.ok("SELECT INBOX"))
        assert facts["FLAGS"] >= SYSTEM_FLAGS | {"later"}
        assert flags_of(one(client, "1", "FLAGS")) == {"\\Answered", "\\Deleted", "later"}


def test_store_with_an_invalid_flag_is_bad_and_changes_nothing(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.append("INBOX", make_message(), flags="\\Seen")
        client.ok("SELECT INBOX")
        for command in ("STORE 1 FLAGS (\\Seen bad]flag)", "STORE 1 +FLAGS (\"quoted\")",
                        "STORE 1 REPLACE (\\Seen)"):
            assert client.command(command).status == "BAD", command
        assert flags_of(one(client, "1", "FLAGS")) - {"\\Recent"} == {"\\Seen"}


# =========================================================================== SEARCH
def make_search_mailbox(client: Wire) -> list[int]:
    """Four messages to search; their UIDs."""
    messages = [
        (make_message("Invoice 2024", b"Please pay the invoice.\r\n",
                      b"X-Priority: 1\r\n").replace(b"Sender <a@spf-pass.test>",
                                                    b"Alice <alice@spf-pass.test>")
         .replace(b"Thu, 01 Jan 2026", b"Mon, 01 Jan 2024"),
         "\\Seen", "01-Jan-2024 10:00:00 +0000"),
        (make_message("Lunch?", b"Pizza at noon?\r\n").replace(
            b"Sender <a@spf-pass.test>", b"Bob <bob@example.test>")
         .replace(b"Thu, 01 Jan 2026", b"Thu, 15 Feb 2024"),
         "\\Flagged $Work", "15-Feb-2024 12:00:00 +0000"),
        (make_message("Re: invoice 2024", b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln.\r\n"
                      + b"filler line\r\n" * 400,
                      b"Content-Type: text/plain; charset=utf-8\r\n"
                      b"Content-Transfer-Encoding: 8bit\r\n").replace(
            b"Thu, 01 Jan 2026", b"Sun, 10 Mar 2024"),
         "", "10-Mar-2024 08:00:00 +0000"),
        (make_message("old stuff", b"Nothing here.\r\n").replace(
            b"Thu, 01 Jan 2026", b"Mon, 01 Apr 2024"),
         "\\Deleted", "01-Apr-2024 18:00:00 +0000"),
    ]
    uids = []
    for raw, flags, date in messages:
        uids.append(client.append("INBOX", raw, flags=flags, date=date)[1])
    client.ok("SELECT INBOX")
    return uids


def test_search_by_flags_and_keywords(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        make_search_mailbox(client)
        assert search(client, "ALL") == [1, 2, 3, 4]
        assert search(client, "SEEN") == [1]
        assert search(client, "UNSEEN") == [2, 3, 4]
        assert search(client, "FLAGGED") == [2]
        assert search(client, "UNFLAGGED") == [1, 3, 4]
        assert search(client, "DELETED") == [4]
        assert search(client, "UNDELETED") == [1, 2, 3]
        assert search(client, "KEYWORD $Work") == [2]
        assert search(client, "UNKEYWORD $Work") == [1, 3, 4]
        assert search(client, "ANSWERED") == []
        assert search(client, "RECENT") == [1, 2, 3, 4]
        assert search(client, "NEW") == [2, 3, 4]
        assert search(client, "OLD") == []


def test_search_by_headers_body_and_text(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        make_search_mailbox(client)
        assert search(client, "FROM alice") == [1]
        assert search(client, 'FROM "bob@example.test"') == [2]
        assert search(client, "TO somebody") == [1, 2, 3, 4]
        assert search(client, "SUBJECT invoice") == [1, 3]  # case-insensitive substring
        assert search(client, 'SUBJECT "INVOICE 2024"') == [1, 3]
        assert search(client, "HEADER X-Priority 1") == [1]
        assert search(client, 'HEADER X-Priority ""') == [1]  # the field is there at all
        assert search(client, "BODY pizza") == [2]
        assert search(client, "BODY lunch") == []  # only in the header
        assert search(client, "TEXT lunch") == [2]
        assert search(client, "TEXT pizza") == [2]
        assert search(client, "CC nobody") == []


def test_search_by_dates_and_sizes(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        make_search_mailbox(client)
        assert search(client, "BEFORE 15-Feb-2024") == [1]
        assert search(client, "ON 15-Feb-2024") == [2]
        assert search(client, "SINCE 15-Feb-2024") == [2, 3, 4]
        assert search(client, 'SINCE "1-Mar-2024" BEFORE 1-Apr-2024') == [3]
        assert search(client, "SENTBEFORE 15-Feb-2024") == [1]
        assert search(client, "SENTON 10-Mar-2024") == [3]
        assert search(client, "SENTSINCE 10-Mar-2024") == [3, 4]
        assert search(client, "LARGER 4000") == [3]
        assert search(client, "SMALLER 4000") == [1, 2, 4]
        assert client.command("SEARCH SINCE 31-Feb-2024").status == "BAD"
        assert client.command("SEARCH LARGER lots").status == "BAD"


def test_search_combines_keys_with_or_not_and_parentheses(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        make_search_mailbox(client)
        assert search(client, "OR FROM alice FROM bob") == [1, 2]
        assert search(client, "NOT SEEN") == [2, 3, 4]
        assert search(client, "NOT NOT SEEN") == [1]
        assert search(client, "SUBJECT invoice NOT SEEN") == [3]  # implicit AND
        assert search(client, "(FLAGGED SUBJECT lunch)") == [2]
        assert search(client, "OR (SEEN) (FLAGGED KEYWORD $Work)") == [1, 2]
        assert search(client, "OR SEEN OR FLAGGED DELETED") == [1, 2, 4]
        assert search(client, "NOT (OR SEEN DELETED) UNFLAGGED") == [3]
        assert client.command("SEARCH (SEEN").status == "BAD"
        assert client.command("SEARCH OR SEEN").status == "BAD"
        assert client.command("SEARCH NONSENSE").status == "BAD"


def test_search_by_sequence_and_uid_sets(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        uids = make_search_mailbox(client)
        assert search(client, "2:3") == [2, 3]
        assert search(client, "2,4 NOT DELETED") == [2]
        assert search(client, "*") == [4]
        assert search(client, f"UID {uids[1]}:{uids[2]}") == [2, 3]
        assert search(client, f"UID {uids[1]}:{uids[2]}", uid=True) == uids[1:3]
        assert search(client, "UID *", uid=True) == [uids[3]]
        assert search(client, "SEEN", uid=True) == [uids[0]]
        assert search(client, f"UID {uids[3] + 1}:{uids[3] + 9}", uid=True) == []


def test_search_with_charset_utf8_matches_non_ascii_and_other_charsets_are_badcharset(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        make_search_mailbox(client)
        needle = "grüße".encode()
        assert search(client, b"CHARSET UTF-8 BODY {%d+}\r\n" % len(needle) + needle) == [3]
        needle = "KÖLN".encode()  # case-insensitive beyond ASCII
        assert search(client, b"CHARSET UTF-8 TEXT {%d+}\r\n" % len(needle) + needle) == [3]
        assert search(client, "CHARSET US-ASCII SUBJECT lunch") == [2]
        reply = client.command("SEARCH CHARSET ISO-8859-1 BODY pizza")
        assert reply.status == "NO" and reply.code.startswith("BADCHARSET"), reply
        assert reply.lines("SEARCH") == []


# =========================================================================== COPY / MOVE
def test_copy_answers_with_copyuid_and_keeps_bytes_and_flags(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        raws = [make_message(f"copy {i}") for i in range(3)]
        uids = [client.append("INBOX", raw, flags="\\Flagged" if i == 1 else None)[1]
                for i, raw in enumerate(raws)]
        archive_validity = int(client.ok("STATUS Archive (UIDVALIDITY)").untagged[0]
                               .split()[-1].rstrip(b")"))
        client.ok("SELECT INBOX")
        reply = client.ok("COPY 2:3 Archive")
        m = re.fullmatch(r"COPYUID (\d+) (\S+) (\S+)", reply.code)
        assert m, reply
        assert int(m.group(1)) == archive_validity
        assert uid_set(m.group(2)) == uids[1:]
        new_uids = uid_set(m.group(3))
        assert len(new_uids) == 2 and new_uids[0] < new_uids[1]
        assert search(client, "ALL") == [1, 2, 3]  # COPY leaves the source alone
        client.ok("SELECT Archive")
        fetched = client.fetch(f"{new_uids[0]}:{new_uids[1]}", "(UID FLAGS BODY.PEEK[])",
                               uid=True)
        assert [v["BODY[]"] for v in fetched.values()] == raws[1:]
        assert [int(v["UID"]) for v in fetched.values()] == new_uids
        assert ["\\Flagged" in flags_of(v) for v in fetched.values()] == [True, False]
        reply = client.command("COPY 1 Nowhere")
        assert reply.status == "NO" and reply.code == "TRYCREATE", reply


def test_uid_move_sends_copyuid_untagged_then_expunges(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        raws = [make_message(f"move {i}") for i in range(4)]
        uids = [client.append("INBOX", raw)[1] for raw in raws]
        client.ok("SELECT INBOX")
        reply = client.ok(f"UID MOVE {uids[0]},{uids[2]} Trash")
        # RFC 6851 4.3: COPYUID in an untagged OK, before the EXPUNGE responses.
        assert reply.untagged[0].startswith(b"* OK [COPYUID "), reply
        m = re.match(rb"\* OK \[COPYUID (\d+) (\S+) (\S+)\]", reply.untagged[0])
        assert m and uid_set(m.group(2).decode()) == [uids[0], uids[2]], reply
        assert len(uid_set(m.group(3).decode())) == 2
        assert len(expunged(reply)) == 2
        assert apply_expunges(uids, reply) == [uids[1], uids[3]]
        assert all_uids(client) == [uids[1], uids[3]]
        reply = client.ok("MOVE 2 Trash")
        assert expunged(reply) == [2]
        assert all_uids(client) == [uids[1]]
        client.ok("SELECT Trash")
        fetched = client.fetch("1:*", "BODY.PEEK[]")
        assert [v["BODY[]"] for v in fetched.values()] == [raws[0], raws[2], raws[3]]
        reply = client.command("MOVE 1 Nowhere")
        assert reply.status == "NO" and reply.code == "TRYCREATE", reply
        assert search(client, "ALL") == [1, 2, 3]


# =========================================================================== EXPUNGE
def test_expunge_removes_every_deleted_message_and_uid_expunge_only_the_given_uids(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        uids = [client.append("INBOX", make_message(f"x{i}"))[1] for i in range(6)]
        client.ok("SELECT INBOX")
        client.ok("STORE 1,3,6 +FLAGS.SILENT (\\Deleted)")
        reply = client.ok("EXPUNGE")
        view = apply_expunges(uids, reply)
        assert view == [uids[1], uids[3], uids[4]] == all_uids(client)
        client.ok("STORE 1:3 +FLAGS.SILENT (\\Deleted)")
        reply = client.ok(f"UID EXPUNGE {uids[3]}")
        view = apply_expunges(view, reply)
        assert view == [uids[1], uids[4]] == all_uids(client)
        assert all("\\Deleted" in flags_of(v) for v in client.fetch("1:*", "FLAGS").values())
        reply = client.ok(f"UID EXPUNGE {uids[0]}:{uids[3]}")  # only uids[1] is left of those
        assert apply_expunges(view, reply) == [uids[4]] == all_uids(client)


def test_close_expunges_silently_and_unselect_does_not(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        for i in range(3):
            client.append("INBOX", make_message(f"c{i}"))
        client.ok("SELECT INBOX")
        client.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        reply = client.ok("UNSELECT")
        assert reply.untagged == []
        assert client.command("FETCH 1 FLAGS").status == "BAD"  # back to authenticated
        client.ok("SELECT INBOX")
        assert search(client, "ALL") == [1, 2, 3]
        reply = client.ok("CLOSE")
        assert reply.untagged == []  # RFC 3501 6.4.2: no untagged EXPUNGE
        assert client.command("FETCH 1 FLAGS").status == "BAD"
        client.ok("EXAMINE INBOX")
        assert search(client, "ALL") == [1, 2]
        assert search(client, "DELETED") == []
        client.ok("SELECT INBOX")
        client.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        client.ok("EXAMINE INBOX")  # RFC 3501 6.3.1: selecting again does not expunge
        assert search(client, "ALL") == [1, 2]
        client.ok("CLOSE")  # nor does CLOSE of a mailbox selected read-only
        client.ok("SELECT INBOX")
        assert search(client, "ALL") == [1, 2]


# =========================================================================== APPEND / UIDs
def test_append_keeps_flags_and_date_and_answers_with_appenduid(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    raw = make_message("appended")
    with session(mailsuite, address) as client:
        uidvalidity, uid = client.append("Drafts", raw, flags="\\Draft \\Seen $Later",
                                         date="05-Nov-2025 23:59:59 +0100")
        client.ok("SELECT Drafts")
        values = one(client, str(uid), "(FLAGS INTERNALDATE BODY.PEEK[])", uid=True)
        facts = select_lines(client.ok("SELECT Drafts"))
    assert facts["UIDVALIDITY"] == uidvalidity and facts["UIDNEXT"] == uid + 1
    assert flags_of(values) - {"\\Recent"} == {"\\Draft", "\\Seen", "$Later"}
    date = datetime.strptime(values["INTERNALDATE"].decode(), "%d-%b-%Y %H:%M:%S %z")
    assert date == datetime(2025, 11, 5, 22, 59, 59, tzinfo=UTC)
    assert values["BODY[]"] == raw


def test_append_to_a_missing_mailbox_is_no_trycreate(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.send("a APPEND Nowhere {11}\r\n")
        reply = client.read()
        if reply.startswith(b"+"):
            client.send("hello there\r\n")
            reply = client.finish("a").tagged
        assert reply.startswith(b"a NO [TRYCREATE]"), reply
        assert client.command('LIST "" Nowhere').untagged == []


def test_append_to_the_selected_mailbox_announces_exists(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.append("INBOX", make_message())
        client.ok("SELECT INBOX")
        reply = client.ok(b"APPEND INBOX {5+}\r\nhello")
        assert b"* 2 EXISTS" in reply.untagged, reply
        assert client.command("APPEND INBOX {0+}\r\n").status in ("NO", "BAD")


def test_uids_ascend_strictly_and_are_never_reused_after_expunge(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        seen: list[int] = []
        seen += [client.append("INBOX", make_message())[1] for _ in range(3)]
        client.ok("SELECT INBOX")
        client.ok("STORE 1:* +FLAGS.SILENT (\\Deleted)")
        client.ok("EXPUNGE")
        seen.append(client.append("INBOX", make_message())[1])
        seen.append(deliver_uid(mailsuite, client, address))
        client.ok("SELECT Archive")
        client.append("Archive", make_message())
        reply = client.ok("MOVE 1 INBOX")
        m = re.match(rb"\* OK \[COPYUID \d+ \S+ (\d+)\]", reply.untagged[0])
        assert m, reply
        seen.append(int(m.group(1)))
        assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
        client.ok("SELECT INBOX")
        assert all_uids(client) == seen[3:]


def deliver_uid(mailsuite: Mailsuite, client: Wire, address: str) -> int:
    deliver(mailsuite, address, make_message("through the mx"))
    return mailsuite.store.messages(address)[-1].uid


# =========================================================================== other sessions
def test_another_sessions_store_expunge_and_append_show_up_after_noop(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as first, session(mailsuite, address) as second:
        uids = [first.append("INBOX", make_message(f"s{i}"))[1] for i in range(3)]
        first.ok("SELECT INBOX")
        second.ok("SELECT INBOX")
        second.ok("STORE 2 +FLAGS (\\Flagged)")
        reply = first.ok("NOOP")
        fetched = fetch_results(reply)
        assert list(fetched) == [2] and "\\Flagged" in flags_of(fetched[2]), reply
        second.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        second.ok("EXPUNGE")
        reply = first.ok("NOOP")
        assert expunged(reply) == [1], reply
        view = apply_expunges(uids, reply)
        _, new = second.append("INBOX", make_message("new"), flags="\\Flagged $Todo")
        reply = first.ok("NOOP")
        assert reply.lines("EXISTS") == [b"* 3 EXISTS"], reply
        assert all_uids(first) == view + [new]
        assert flags_of(one(first, "3", "FLAGS")) >= {"\\Flagged", "$Todo"}


def test_expunge_is_not_sent_in_reply_to_fetch_store_or_search_but_to_noop(
        mailsuite: Mailsuite) -> None:
    # RFC 3501 7.4.1: no EXPUNGE response while FETCH, STORE or SEARCH runs (UID versions
    # excepted), so the sequence numbers of the command stay valid.
    address = mailsuite.new_account()
    with session(mailsuite, address) as first, session(mailsuite, address) as second:
        uids = [first.append("INBOX", make_message(f"e{i}"))[1] for i in range(4)]
        first.ok("SELECT INBOX")
        second.ok("SELECT INBOX")
        second.ok("STORE 2:3 +FLAGS.SILENT (\\Deleted)")
        second.ok("EXPUNGE")
        for command in ("FETCH 1:4 (FLAGS)", "STORE 4 +FLAGS (\\Seen)", "SEARCH ALL",
                        "FETCH 4 BODY.PEEK[HEADER]"):
            reply = first.ok(command)
            assert expunged(reply) == [], (command, reply)
        # The numbers still count the gone messages (which may or may not match).
        assert {1, 4} <= set(search(first, "ALL")) <= {1, 2, 3, 4}
        reply = first.ok("NOOP")
        assert len(expunged(reply)) == 2, reply
        assert apply_expunges(uids, reply) == [uids[0], uids[3]] == all_uids(first)
        seen = first.fetch("2", "(UID FLAGS)")[2]
        assert int(seen["UID"]) == uids[3] and "\\Seen" in flags_of(seen)


def test_recent_belongs_to_one_session_only(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as first, session(mailsuite, address) as second:
        first.append("INBOX", make_message())
        assert select_lines(first.ok("SELECT INBOX"))["RECENT"] == 1
        assert select_lines(second.ok("SELECT INBOX"))["RECENT"] == 0
        assert "\\Recent" in flags_of(one(first, "1", "FLAGS"))
        assert "\\Recent" not in flags_of(one(second, "1", "FLAGS"))
