"""IMAP mailboxes against the running service: LIST and LSUB (RFC 3501 6.3.8-6.3.9) with
SPECIAL-USE (RFC 6154) and CHILDREN (RFC 3348) attributes, CREATE, DELETE, RENAME, SUBSCRIBE,
UNSUBSCRIBE and STATUS (6.3.3-6.3.7, 6.3.10), names in modified UTF-7 (5.1.3), one account's
mailboxes hidden from another, and UIDVALIDITY (2.3.1.1).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tests.harness import Mailsuite, wait_listening
from tests.imap.test_imap_session import (
    Atom,
    Wire,
    make_message,
    parse_data,
    quote,
    session,
)

DEFAULT_FOLDERS = {"INBOX": None, "Archive": "\\Archive", "Drafts": "\\Drafts",
                   "Junk": "\\Junk", "Sent": "\\Sent", "Trash": "\\Trash"}


def listing(client: Wire, reference: str, pattern: str,
            verb: str = "LIST") -> dict[str, set[str]]:
    """Mailbox name (as sent, modified UTF-7) → its attributes, from LIST or LSUB."""
    reply = client.ok(f"{verb} {quote(reference)} {quote(pattern)}")
    out: dict[str, set[str]] = {}
    for line in reply.untagged:
        assert line.startswith(f"* {verb} ".encode()), line
        attributes, delimiter, name = parse_data(line[len(verb) + 3:])
        assert delimiter == b"/", line
        wire = str(name) if isinstance(name, Atom) else name.decode("ascii")
        assert wire not in out, f"{wire} listed twice"
        out[wire] = {str(a) for a in attributes}
    return out


def status(client: Wire, mailbox: str,
           items: str = "MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN") -> dict[str, int]:
    reply = client.ok(f"STATUS {quote(mailbox)} ({items})")
    [line] = reply.lines("STATUS")
    m = re.fullmatch(rb"\* STATUS (.+) \(([^)]*)\)", line)
    assert m, line
    [name] = parse_data(m.group(1))
    assert (str(name) if isinstance(name, Atom) else name.decode()) == mailbox, line
    words = m.group(2).decode().split()
    return {key: int(value) for key, value in zip(words[::2], words[1::2], strict=True)}


def names(mailboxes: dict[str, set[str]]) -> set[str]:
    return set(mailboxes)


# =========================================================================== LIST
def test_list_percent_shows_the_six_default_folders_with_their_special_use_attributes(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        boxes = listing(client, "", "%")
    assert names(boxes) == set(DEFAULT_FOLDERS)
    for name, special_use in DEFAULT_FOLDERS.items():
        expected = {"\\HasNoChildren"} | ({special_use} if special_use else set())
        # \Subscribed (RFC 5258) may come along; nothing else may.
        assert boxes[name] - {"\\Subscribed"} == expected, (name, boxes[name])


def test_list_star_matches_every_level_and_percent_stops_at_the_delimiter(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Work/2024/Q1")
        client.ok("CREATE Work/Notes")
        client.ok("CREATE Workshop")
        work = {"Work", "Work/2024", "Work/2024/Q1", "Work/Notes"}
        assert names(listing(client, "", "*")) == set(DEFAULT_FOLDERS) | work | {"Workshop"}
        assert names(listing(client, "", "%")) == set(DEFAULT_FOLDERS) | {"Work", "Workshop"}
        assert names(listing(client, "", "Work/%")) == {"Work/2024", "Work/Notes"}
        assert names(listing(client, "", "Work/*")) == {"Work/2024", "Work/2024/Q1",
                                                       "Work/Notes"}
        assert names(listing(client, "", "Work*")) == work | {"Workshop"}
        assert names(listing(client, "", "Work%")) == {"Work", "Workshop"}
        assert names(listing(client, "", "*/Q1")) == {"Work/2024/Q1"}
        assert names(listing(client, "", "%/%")) == {"Work/2024", "Work/Notes"}
        assert names(listing(client, "", "work")) == set()  # names are case-sensitive
        assert names(listing(client, "", "inBox")) == {"INBOX"}  # except INBOX


def test_list_reference_is_prefixed_to_the_pattern(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Work/2024/Q1")
        client.ok("CREATE Work/Notes")
        assert names(listing(client, "Work/", "%")) == {"Work/2024", "Work/Notes"}
        assert names(listing(client, "Work/", "*")) == {"Work/2024", "Work/2024/Q1",
                                                       "Work/Notes"}
        assert names(listing(client, "Work/2024/", "Q1")) == {"Work/2024/Q1"}
        assert names(listing(client, "Nothing/", "*")) == set()


def test_list_with_an_empty_pattern_gives_the_delimiter_and_root(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        reply = client.ok('LIST "" ""')
    assert reply.untagged == [b'* LIST (\\Noselect) "/" ""']


def test_has_children_and_has_no_children_follow_the_hierarchy(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Projects/Alpha")
        client.ok("CREATE INBOX/Receipts")
        boxes = listing(client, "", "*")
        assert "\\HasChildren" in boxes["Projects"] and "\\HasNoChildren" not in boxes["Projects"]
        assert "\\HasChildren" in boxes["INBOX"]
        assert "\\HasNoChildren" in boxes["Projects/Alpha"]
        assert "\\HasNoChildren" in boxes["INBOX/Receipts"]
        client.ok("DELETE Projects/Alpha")
        boxes = listing(client, "", "*")
        assert "\\HasNoChildren" in boxes["Projects"] and "\\HasChildren" not in boxes["Projects"]


# =========================================================================== CREATE / DELETE
def test_create_makes_the_missing_parents_selectable_too(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE a/b/c")
        assert {"a", "a/b", "a/b/c"} <= names(listing(client, "", "*"))
        for name in ("a", "a/b", "a/b/c"):
            client.ok(f"SELECT {name}")
            assert "\\Noselect" not in listing(client, "", name)[name]
        client.ok("CREATE a/b/d/")  # a trailing delimiter is dropped (RFC 3501 6.3.3)
        assert "a/b/d" in names(listing(client, "", "*"))


def test_create_of_an_existing_mailbox_or_inbox_is_no(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Reports")
        for name in ("Reports", "INBOX", "inbox", "Sent"):
            reply = client.command(f"CREATE {name}")
            assert reply.status == "NO", (name, reply)
        assert names(listing(client, "", "*")) == set(DEFAULT_FOLDERS) | {"Reports"}


def test_delete_removes_the_mailbox_and_its_messages(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Old")
        client.append("Old", make_message("in the old box"))
        client.ok("DELETE Old")
        assert "Old" not in names(listing(client, "", "*"))
        assert client.command("SELECT Old").status == "NO"
        assert client.command("STATUS Old (MESSAGES)").status == "NO"
        client.ok("CREATE Old")
        assert status(client, "Old")["MESSAGES"] == 0  # nothing came back with the name


def test_delete_of_inbox_or_of_a_missing_mailbox_is_no(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.append("INBOX", make_message())
        for name in ("INBOX", "Inbox", "Missing"):
            reply = client.command(f"DELETE {name}")
            assert reply.status == "NO", (name, reply)
        assert status(client, "INBOX")["MESSAGES"] == 1


def test_delete_of_the_selected_mailbox_leaves_nothing_selected(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Doomed")
        client.ok("SELECT Doomed")
        client.ok("DELETE Doomed")
        assert client.command("FETCH 1:* FLAGS").status == "BAD"  # not in the selected state
        client.ok("SELECT INBOX")


def test_deleting_a_mailbox_with_children_is_refused_and_nothing_is_lost(
        mailsuite: Mailsuite) -> None:
    # RFC 3501 6.3.4 lets a server turn the name into \Noselect; like Dovecot, we refuse
    # instead (NO [INUSE]), so no half-usable folder is left behind.
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Parent/Child")
        client.append("Parent", make_message("parent"))
        client.append("Parent/Child", make_message("child"))
        reply = client.command("DELETE Parent")
        assert reply.status == "NO" and "[INUSE]" in reply.text, reply
        boxes = listing(client, "", "*")
        assert "Parent" in boxes and "Parent/Child" in boxes
        assert status(client, "Parent")["MESSAGES"] == 1
        assert status(client, "Parent/Child")["MESSAGES"] == 1
        client.ok("DELETE Parent/Child")
        client.ok("DELETE Parent")
        assert "Parent" not in listing(client, "", "*")


# =========================================================================== RENAME
def test_rename_moves_the_children_along(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Work/2024/Q1")
        client.ok("CREATE Work/Notes")
        client.ok("CREATE Workshop")
        _, uid = client.append("Work/2024", make_message("kept"))
        before = status(client, "Work/2024")
        client.ok("RENAME Work Job")
        boxes = names(listing(client, "", "*"))
        assert {"Job", "Job/2024", "Job/2024/Q1", "Job/Notes", "Workshop"} <= boxes
        assert not {"Work", "Work/2024", "Work/2024/Q1", "Work/Notes"} & boxes
        after = status(client, "Job/2024")
        assert after == before  # the same mailbox: messages, UIDs and UIDVALIDITY kept
        client.ok("SELECT Job/2024")
        assert client.fetch(f"{uid}", "UID", uid=True)[1]["UID"] == str(uid)


def test_rename_to_an_existing_name_or_from_a_missing_one_is_no(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE One")
        client.ok("CREATE Two")
        for old, new in (("One", "Two"), ("Missing", "Three"), ("One", "INBOX"),
                         ("One", "One/Inner")):
            reply = client.command(f"RENAME {old} {new}")
            assert reply.status == "NO", (old, new, reply)
        assert {"One", "Two"} <= names(listing(client, "", "*"))
        assert not {"Three", "One/Inner"} & names(listing(client, "", "*"))


def test_rename_of_inbox_moves_its_messages_and_leaves_inbox_empty(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        raws = [make_message(f"message {i}") for i in range(3)]
        for raw in raws:
            client.append("INBOX", raw)
        client.ok("CREATE INBOX/Child")
        client.ok("RENAME INBOX Saved/2024")
        assert status(client, "INBOX")["MESSAGES"] == 0
        assert status(client, "Saved/2024")["MESSAGES"] == 3
        boxes = names(listing(client, "", "*"))
        # RFC 3501 6.3.5: INBOX stays, and its inferior names are not renamed.
        assert {"INBOX", "INBOX/Child", "Saved", "Saved/2024"} <= boxes
        client.ok("SELECT Saved/2024")
        fetched = client.fetch("1:*", "BODY.PEEK[]")
        assert [fetched[i]["BODY[]"] for i in (1, 2, 3)] == raws
        client.ok("SELECT INBOX")
        client.append("INBOX", make_message("new mail"))
        assert status(client, "INBOX")["MESSAGES"] == 1


# =========================================================================== subscriptions
def test_unsubscribe_hides_a_mailbox_from_lsub_and_subscribe_brings_it_back(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE News/Daily")
        client.ok("SUBSCRIBE News/Daily")
        assert "News/Daily" in listing(client, "", "*", "LSUB")
        client.ok("UNSUBSCRIBE News/Daily")
        subscribed = listing(client, "", "*", "LSUB")
        assert "News/Daily" not in subscribed
        assert "News/Daily" in names(listing(client, "", "*"))  # LIST still shows it
        client.ok("SUBSCRIBE News/Daily")
        assert "News/Daily" in listing(client, "", "News/*", "LSUB")
        assert names(listing(client, "", "News/%", "LSUB")) == {"News/Daily"}


def test_lsub_with_percent_and_a_reference_matches_like_list(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Lists/python")
        client.ok("CREATE Lists/rust")
        for name in ("Lists", "Lists/python", "Lists/rust"):
            client.ok(f"SUBSCRIBE {name}")
        client.ok("UNSUBSCRIBE Lists/rust")
        assert names(listing(client, "Lists/", "%", "LSUB")) == {"Lists/python"}
        assert {"Lists", "Lists/python"} <= names(listing(client, "", "*", "LSUB"))


def test_a_subscription_outlives_the_deletion_of_its_mailbox(mailsuite: Mailsuite) -> None:
    # RFC 3501 6.3.6: the server "MUST NOT unilaterally remove an existing mailbox name from
    # the subscription list even if a mailbox by that name no longer exists".
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        client.ok("CREATE Ephemeral")
        client.ok("SUBSCRIBE Ephemeral")
        client.ok("DELETE Ephemeral")
        assert "Ephemeral" in listing(client, "", "*", "LSUB")
        client.ok("UNSUBSCRIBE Ephemeral")
        assert "Ephemeral" not in listing(client, "", "*", "LSUB")


# =========================================================================== STATUS
def test_status_counts_messages_recent_unseen_and_gives_uidnext_and_uidvalidity(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client, session(mailsuite, address) as other:
        empty = status(client, "INBOX")
        assert (empty["MESSAGES"], empty["RECENT"], empty["UNSEEN"]) == (0, 0, 0)
        uidvalidity, first = client.append("INBOX", make_message("one"))
        client.append("INBOX", make_message("two"), flags="\\Seen")
        _, last = client.append("INBOX", make_message("three"), flags="\\Flagged")
        assert empty["UIDVALIDITY"] == uidvalidity and empty["UIDNEXT"] <= first
        assert status(client, "INBOX") == {"MESSAGES": 3, "RECENT": 3, "UIDNEXT": last + 1,
                                           "UIDVALIDITY": uidvalidity, "UNSEEN": 2}
        assert status(client, "INBOX", "UNSEEN MESSAGES") == {"UNSEEN": 2, "MESSAGES": 3}
        other.ok("SELECT INBOX")  # that session takes the \Recent messages
        assert status(client, "INBOX")["RECENT"] == 0
        other.ok("STORE 1 +FLAGS (\\Seen)")
        assert status(client, "INBOX")["UNSEEN"] == 1


def test_status_of_a_missing_mailbox_is_no_and_of_an_unknown_item_bad(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        assert client.command("STATUS Missing (MESSAGES)").status == "NO"
        assert client.command("STATUS INBOX (MESSAGES BOGUS)").status == "BAD"
        assert client.command("STATUS INBOX ()").status == "BAD"
        client.ok("STATUS INBOX (MESSAGES)")


# =========================================================================== names
def test_non_ascii_mailbox_names_round_trip_through_modified_utf7(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    name, wire = "Entwürfe/台北", "Entw&APw-rfe/&U,BTFw-"
    with session(mailsuite, address) as client:
        client.ok(f"CREATE {quote(wire)}")
        client.ok("CREATE R&-D")
        boxes = listing(client, "", "*")
        assert {"Entw&APw-rfe", wire, "R&-D"} <= names(boxes)
        assert names(listing(client, "Entw&APw-rfe/", "%")) == {wire}
        client.append(wire, make_message("grüße"))
        assert status(client, wire)["MESSAGES"] == 1
        account = mailsuite.store.account_get(address)
        assert name in {box.name for box in mailsuite.store.mailbox_list(account.id)}
        client.ok(f"SELECT {quote(wire)}")
        client.ok(f"RENAME {quote(wire)} &ZeVnLIqe-")  # 日本語
        assert "&ZeVnLIqe-" in names(listing(client, "", "*"))
    stored = {box.name for box in mailsuite.store.mailbox_list(account.id)}
    assert {"Entwürfe", "日本語", "R&D"} <= stored  # the store keeps the names decoded


def test_a_malformed_modified_utf7_name_is_refused(mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        before = names(listing(client, "", "*"))
        for wire in ("&ZeVnLIqe", "Bad&Jjo!-", "&AGEAYgBj-", "R&D", "&U,BTFw"):
            reply = client.command(f"CREATE {quote(wire)}")
            assert reply.status in ("BAD", "NO"), (wire, reply)
            assert client.command(f"SELECT {quote(wire)}").status in ("BAD", "NO"), wire
        assert names(listing(client, "", "*")) == before
        client.send(b'a CREATE "Entw\xc3\xbcrfe"\r\n')  # raw UTF-8 is no modified UTF-7
        assert client.finish("a").status in ("BAD", "NO")
        assert names(listing(client, "", "*")) == before


# =========================================================================== accounts
def test_an_account_never_sees_or_opens_another_accounts_mailboxes(
        mailsuite: Mailsuite) -> None:
    domain = mailsuite.new_domain()
    alice, bob = mailsuite.new_account(domain), mailsuite.new_account(domain)
    with session(mailsuite, alice) as client:
        client.ok("CREATE Secret/Plans")
        client.append("Secret/Plans", make_message("the plans"))
        client.append("INBOX", make_message("for alice"))
    with session(mailsuite, bob) as client:
        everything = names(listing(client, "", "*"))
        assert everything == set(DEFAULT_FOLDERS)
        assert listing(client, "", "Secret*") == {}
        assert listing(client, "", "*", "LSUB").keys() <= set(DEFAULT_FOLDERS)
        for name in ("Secret", "Secret/Plans"):
            assert client.command(f"SELECT {name}").status == "NO"
            assert client.command(f"EXAMINE {name}").status == "NO"
            assert client.command(f"STATUS {name} (MESSAGES)").status == "NO"
            assert client.command(f"DELETE {name}").status == "NO"
            assert client.command(f"RENAME {name} Mine").status == "NO"
            reply = client.command(f"APPEND {name} {{5+}}\r\nhello")
            assert reply.status == "NO", reply
        assert status(client, "INBOX")["MESSAGES"] == 0
        client.append("INBOX", make_message("for bob"))
        client.ok("SELECT INBOX")
        assert client.command("COPY 1 Secret/Plans").status == "NO"
        assert client.command("MOVE 1 Secret/Plans").status == "NO"
    with session(mailsuite, alice) as client:
        assert status(client, "Secret/Plans")["MESSAGES"] == 1
        assert status(client, "INBOX")["MESSAGES"] == 1


# =========================================================================== UIDVALIDITY
def test_uidvalidity_and_uidnext_survive_a_server_restart(
        start_mailsuite: Callable[..., Mailsuite]) -> None:
    server = start_mailsuite()
    address = server.new_account()
    with session(server, address) as client:
        client.ok("CREATE Kept")
        client.append("Kept", make_message())
        before = {name: status(client, name) for name in ("INBOX", "Kept", "Sent")}
    server.stop()
    server.start()
    wait_listening(server.imaps)
    with session(server, address) as client:
        after = {name: status(client, name) for name in ("INBOX", "Kept", "Sent")}
        _, uid = client.append("Kept", make_message())
    for values in (before, after):
        for box in values.values():
            box.pop("RECENT")  # a new process may count \Recent anew
    assert after == before
    assert uid == before["Kept"]["UIDNEXT"]


def test_a_mailbox_deleted_and_created_again_gets_a_new_uidvalidity(
        mailsuite: Mailsuite) -> None:
    address = mailsuite.new_account()
    with session(mailsuite, address) as client:
        seen = set()
        for _ in range(3):
            client.ok("CREATE Phoenix")
            uidvalidity, _ = client.append("Phoenix", make_message())
            assert status(client, "Phoenix")["UIDVALIDITY"] == uidvalidity
            seen.add(uidvalidity)
            client.ok("DELETE Phoenix")
        assert len(seen) == 3
        client.ok("CREATE Phoenix/Ashes")
        client.ok("RENAME Phoenix Ember")  # a rename keeps UIDVALIDITY, a new name gets one
        client.ok("CREATE Phoenix")
        assert status(client, "Phoenix")["UIDVALIDITY"] not in seen | {
            status(client, "Ember")["UIDVALIDITY"]}
