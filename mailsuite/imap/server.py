"""IMAP4rev1 (RFC 3501) with IDLE, UIDPLUS, MOVE, UNSELECT, ENABLE, ID, NAMESPACE,
SPECIAL-USE, CHILDREN, LITERAL+ and SASL-IR, over the shared store.

Written on our own line protocol instead of twisted.mail.imap4, whose mailbox interfaces are
synchronous (the database would run on the reactor thread), whose IDLE ends on any line and
whose output is buffered without bound. Commands run one at a time; a FETCH writes its
answer in chunks and waits while the client is not reading.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from twisted.internet import defer, interfaces, protocol, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailsuite import __version__
from mailsuite.auth import Authenticator, SASLError, decode_sasl_plain
from mailsuite.config import Config
from mailsuite.imap import fetch as fetching
from mailsuite.imap import parser as p
from mailsuite.imap import search as searching
from mailsuite.imap.selected import Selected, flag_list
from mailsuite.imap.utf7 import encode_mailbox
from mailsuite.lineproto import SerialLineProtocol
from mailsuite.netlimits import ConnectionCounter
from mailsuite.notify import Notifier
from mailsuite.store import AccountRow, AsyncStore, InUse, NotFound, StoreError
from mailsuite.structure import imap_structure as structure_of

log = Logger(namespace="mailsuite.imap")

FETCH_CHUNK = 200  # messages loaded from the store per round trip
# Octets of messages one SEARCH or FETCH loads at a time (a bigger message is loaded alone):
# with the parsing, decoding or rendering of one message on top, what a session holds stays
# in the tens of MB, however big the mailbox and however slowly the client reads.
BATCH_BYTES = 4 << 20
MAX_LITERALS = 64  # literals in one command
PRE_AUTH_LITERAL = 8192  # octets of literals in one command before login (LOGIN's two strings)
PERMANENT_FLAGS = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)"
SYSTEM_FLAGS = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"


class IMAPError(Exception):
    """A command failed: answer `status text` (status is NO or BAD)."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class IMAPFactory(protocol.ServerFactory):
    def __init__(self, config: Config, store: AsyncStore, authenticator: Authenticator,
                 notifier: Notifier, tls_options: Any | None, reactor: Any,
                 per_ip: ConnectionCounter, per_account: ConnectionCounter,
                 implicit_tls: bool = False) -> None:
        self.config = config
        self.store = store
        self.authenticator = authenticator
        self.notifier = notifier
        self.tls_options = tls_options
        self.reactor = reactor
        self.implicit_tls = implicit_tls
        self.per_ip = per_ip  # both shared by the imap and imaps listeners
        self.per_account = per_account

    def buildProtocol(self, addr: Any) -> IMAPServer:
        proto = IMAPServer()
        proto.factory = self
        return proto


@implementer(interfaces.IPushProducer)
class _OutputGate:
    """Registered with the transport during long answers: tells us when to stop writing."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False  # the connection is gone: the transport has let go of us
        self._waiting: list[defer.Deferred] = []

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    def wait(self) -> defer.Deferred:
        if not self.paused:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d


class IMAPServer(SerialLineProtocol):
    factory: IMAPFactory

    def __init__(self) -> None:
        super().__init__()
        self.state = "NOT_AUTHENTICATED"
        self.tls = False
        self.peer = ""
        self.account: AccountRow | None = None
        self.selected: Selected | None = None
        self._parts: list[bytes] = []  # the command being read: lines and literals
        self._literal_left = 0
        self._literal = bytearray()
        self._literal_total = 0
        self._idle_tag: str | None = None
        self._sasl_tag: str | None = None
        self._gate = _OutputGate()
        self._syncing = False
        self._sync_again = False
        self._started = time.monotonic()
        self._commands = 0
        self._counted_ip = False
        self._counted_account = False

    # --- connection ----------------------------------------------------------------------
    @property
    def store(self) -> AsyncStore:
        return self.factory.store

    @property
    def config(self) -> Config:
        return self.factory.config

    @property
    def auth_allowed(self) -> bool:
        return self.tls or self.config.auth.allow_plaintext

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        self.tls = self.factory.implicit_tls
        self.max_line = self.config.imap.max_line
        if not self.factory.per_ip.acquire(self.peer):
            self.send("* BYE too many connections from your address")
            self.close()
            return
        self._counted_ip = True
        self.setTimeout(self.config.imap.idle_timeout)
        self.command_deadline = self.config.imap.command_timeout
        self.set_deadline("login", self.config.imap.login_timeout)
        self.send(f"* OK [CAPABILITY {self.capabilities()}] mailsuite IMAP4rev1 ready")

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self._stop_idle()
        if self._counted_ip:
            self.factory.per_ip.release(self.peer)
        if self._counted_account and self.account is not None:
            self.factory.per_account.release(self.account.address)
        log.info("imap session peer={peer} user={user} tls={tls} commands={commands} "
                 "time={elapsed:.3f}s", peer=self.peer,
                 user=self.account.address if self.account else "-",
                 tls="yes" if self.tls else "no", commands=self._commands,
                 elapsed=time.monotonic() - self._started)

    def timeoutConnection(self) -> None:
        self.send("* BYE autologout; idle for too long")
        self.close()

    def deadline_exceeded(self, name: str) -> None:
        self.send(f"* BYE {'login' if name == 'login' else 'command line'} took too long")

    def send(self, line: str) -> None:
        if not self.gone:
            self.transport.write(line.encode("utf-8") + b"\r\n")

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE",
                "UIDPLUS", "MOVE", "UNSELECT", "SPECIAL-USE", "CHILDREN"]
        if self.state == "NOT_AUTHENTICATED":
            if self.factory.tls_options is not None and not self.tls:
                caps.append("STARTTLS")
            if self.auth_allowed:
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
        return " ".join(caps)

    # --- reading commands with their literals --------------------------------------------
    def raw_mode(self) -> bool:
        return self._literal_left > 0

    def consume_raw(self) -> bool:
        take = self._buffer[: self._literal_left]
        del self._buffer[: len(take)]
        self._literal += take
        self._literal_left -= len(take)
        if self._literal_left:
            return False
        self._parts.append(bytes(self._literal))
        self._literal = bytearray()
        return True

    def line_too_long(self) -> None:
        self.send(f"* BAD command line longer than {self.max_line} octets")
        self._parts = []

    def line_received(self, line: bytes) -> defer.Deferred | None:
        if self._idle_tag is not None:
            return self._idle_line(line)
        if self._sasl_tag is not None:
            tag, self._sasl_tag = self._sasl_tag, None
            return self._run(tag, self._authenticate_response(tag, line))
        if self._parts:  # the line after a literal
            self._parts.append(line)
        else:
            self._parts = [line]
            self._literal_total = 0
        try:
            marker = p.literal_at_end(line)
        except p.ParseError as exc:  # e.g. {4294967296}: refused before anything is read
            self.send(f"{_guess_tag(self._parts[0])} BAD {exc}")
            self._parts = []
            return None
        if marker is not None:
            return self._start_literal(*marker)
        parts, self._parts = self._parts, []
        return self._command(parts)

    def _start_literal(self, size: int, non_sync: bool) -> None:
        tag = _guess_tag(self._parts[0])
        is_append = _guess_name(self._parts[0]) == "APPEND"
        self._literal_total += size
        count = len(self._parts) // 2 + 1
        if self.state == "NOT_AUTHENTICATED":
            # Nothing before login needs more than a user name and a password: a client
            # without an account gets no buffer of the message size limit.
            limit = total_limit = PRE_AUTH_LITERAL
        else:
            limit = self.config.smtp.max_message_size if is_append else self.config.imap.max_literal
            total_limit = limit + self.config.imap.max_literal
        if size > limit or self._literal_total > total_limit or count > MAX_LITERALS:
            self._parts = []
            code = "NO [TOOBIG]" if is_append and self.state != "NOT_AUTHENTICATED" else "BAD"
            if non_sync:
                # The client sends the octets anyway, and we cannot tell them from commands
                # without reading them all: answer, then close (RFC 7888 4).
                self.send(f"{tag} BAD [TOOBIG] literal of {size} octets is too large")
                self.send("* BYE closing: the literal cannot be skipped")
                self.close()
                return
            self.send(f"{tag} {code} literal too large")  # and no "+": the client sends nothing
            return
        if not non_sync:
            self.send("+ Ready for literal data")
        if size == 0:
            self._parts.append(b"")  # nothing to read; the next line continues the command
        self._literal_left = size

    def _command(self, parts: list[bytes]) -> defer.Deferred | None:
        self._commands += 1
        try:
            command = p.parse_command(parts)
        except p.ParseError as exc:
            tag = exc.tag or _guess_tag(parts[0]) or "*"
            self.send(f"{tag} BAD {exc}")
            return None
        handler = getattr(self, "cmd_" + command.name.replace(" ", "_"), None)
        if handler is None:
            self.send(f"{command.tag} BAD unknown command {command.name}")
            return None
        allowed = _STATES.get(command.name.split()[-1], ())
        if self.state not in allowed:
            self.send(f"{command.tag} BAD {command.name} is not allowed now")
            return None
        try:
            work = handler(command.tag, command.args)
        except Exception:
            return self._run(command.tag, defer.fail())
        return self._run(command.tag, work)

    def _run(self, tag: str, work: Any) -> defer.Deferred | None:
        """Finish a command: its text, or a Deferred/coroutine producing it, then the tag."""
        if work is None:
            return None
        if isinstance(work, str):
            self.send(f"{tag} {work}")
            return None
        d = work if isinstance(work, defer.Deferred) else defer.ensureDeferred(work)
        d.addCallbacks(lambda text: text is not None and self.send(f"{tag} {text}"),
                       self._failed, errbackArgs=(tag,))
        return d

    def _failed(self, failure: Any, tag: str) -> None:
        if failure.check(IMAPError):
            self.send(f"{tag} {failure.value.status} {failure.value.text}")
        elif failure.check(p.ParseError):
            self.send(f"{tag} BAD {failure.value}")
        elif failure.check(NotFound):
            self.send(f"{tag} NO [NONEXISTENT] {failure.value}")
        elif failure.check(InUse):
            self.send(f"{tag} NO [INUSE] {failure.value}")
        elif failure.check(StoreError):
            self.send(f"{tag} NO {failure.value}")
        else:
            log.failure("imap command failed", failure=failure)
            self.send(f"{tag} NO [SERVERBUG] internal error, try again")

    # --- any state -----------------------------------------------------------------------
    def cmd_CAPABILITY(self, tag: str, args: list) -> str:
        _no_args(args)
        self.send(f"* CAPABILITY {self.capabilities()}")
        return "OK CAPABILITY completed"

    async def cmd_NOOP(self, tag: str, args: list) -> str:
        _no_args(args)
        await self.sync(allow_expunge=True)
        return "OK NOOP completed"

    def cmd_LOGOUT(self, tag: str, args: list) -> None:
        _no_args(args)
        self.send("* BYE mailsuite logging out")
        self.send(f"{tag} OK LOGOUT completed")
        self.close()

    def cmd_ID(self, tag: str, args: list) -> str:
        self.send(f'* ID ("name" "mailsuite" "version" "{__version__}")')
        return "OK ID completed"

    # --- not authenticated ---------------------------------------------------------------
    def cmd_STARTTLS(self, tag: str, args: list) -> str | None:
        _no_args(args)
        if self.tls or self.factory.tls_options is None:
            return "BAD TLS is not available here"
        self.send(f"{tag} OK begin TLS negotiation now")
        self.discard_input()  # RFC 3501 6.2.1: nothing pipelined in plaintext counts
        self._parts = []
        self.transport.startTLS(self.factory.tls_options)
        self.tls = True
        return None

    def cmd_LOGIN(self, tag: str, args: list) -> Any:
        if not self.auth_allowed:
            return "NO [PRIVACYREQUIRED] LOGIN is disabled until STARTTLS"
        if len(args) != 2:
            raise p.ParseError("LOGIN takes a user name and a password")
        user = p.astring(args[0]).decode("utf-8", "replace")
        password = p.astring(args[1]).decode("utf-8", "replace")
        return self._login(user, password)

    def cmd_AUTHENTICATE(self, tag: str, args: list) -> Any:
        if not args or p.keyword(args[0]) != "PLAIN" or len(args) > 2:
            return "NO [CANNOT] only AUTHENTICATE PLAIN is supported"
        if not self.auth_allowed:
            return "NO [PRIVACYREQUIRED] authentication is disabled until STARTTLS"
        if len(args) == 2:  # SASL-IR (RFC 4959)
            return self._authenticate_response(tag, p.astring(args[1]))
        self._sasl_tag = tag
        self.send("+ ")
        return None

    def _authenticate_response(self, tag: str, response: bytes) -> Any:
        text = response.decode("ascii", "replace").strip()
        if text == "*":
            return "BAD authentication cancelled"
        try:
            user, password = decode_sasl_plain("" if text == "=" else text)
        except SASLError as exc:
            return f"NO [AUTHENTICATIONFAILED] {exc}"
        return self._login(user, password)

    async def _login(self, user: str, password: str) -> str:
        account = await self.factory.authenticator.login(user, password, self.peer)
        if self.gone:
            return "NO connection closed"  # connectionLost ran already: take no slot now
        if account is None:
            if self.factory.authenticator.should_disconnect(self.peer):
                self.send("* BYE too many failed logins")
                self.close()
            return "NO [AUTHENTICATIONFAILED] invalid credentials"
        if not self.factory.per_account.acquire(account.address):
            return "NO [LIMIT] too many connections to this account"
        self._counted_account = True
        self.account = account
        self.state = "AUTHENTICATED"
        self.set_deadline("login", None)
        return f"OK [CAPABILITY {self.capabilities()}] logged in"

    # --- authenticated -------------------------------------------------------------------
    def cmd_ENABLE(self, tag: str, args: list) -> str:
        if not args:
            raise p.ParseError("ENABLE needs at least one capability")
        self.send("* ENABLED")  # nothing we offer changes behaviour when enabled
        return "OK ENABLE completed"

    def cmd_NAMESPACE(self, tag: str, args: list) -> str:
        _no_args(args)
        self.send('* NAMESPACE (("" "/")) NIL NIL')
        return "OK NAMESPACE completed"

    async def cmd_SELECT(self, tag: str, args: list, readonly: bool = False) -> str:
        if len(args) != 1:
            raise p.ParseError("SELECT takes a mailbox name")
        name = _mailbox(args[0])
        self._deselect()  # a failed SELECT leaves nothing selected (RFC 3501 6.3.1)
        self.state = "AUTHENTICATED"
        assert self.account is not None
        snap = await self.store.mailbox_select(self.account.id, name, not readonly)
        box = Selected.from_snapshot(snap, readonly)
        keywords = " ".join(sorted(box.keywords))
        self.send(f"* FLAGS ({SYSTEM_FLAGS}{' ' + keywords if keywords else ''})")
        self.send(f"* {box.exists} EXISTS")
        self.send(f"* {len(box.recent)} RECENT")
        unseen = next((i for i, uid in enumerate(box.uids, 1)
                       if "\\Seen" not in box.flags[uid].split()), None)
        if unseen is not None:
            self.send(f"* OK [UNSEEN {unseen}] first unseen")
        self.send(f"* OK [UIDVALIDITY {box.uidvalidity}] UIDs valid")
        self.send(f"* OK [UIDNEXT {box.uidnext}] predicted next UID")
        self.send("* OK [PERMANENTFLAGS " + ("()" if readonly else PERMANENT_FLAGS)
                  + "] limited")
        self.selected = box
        self.state = "SELECTED"
        self.factory.notifier.watch(box.id, self._mailbox_changed)
        return f"OK [{'READ-ONLY' if readonly else 'READ-WRITE'}] {name} selected"

    async def cmd_EXAMINE(self, tag: str, args: list) -> str:
        return await self.cmd_SELECT(tag, args, readonly=True)

    async def cmd_CREATE(self, tag: str, args: list) -> str:
        name = self._one_mailbox(args, creating=True)
        if name == "INBOX":
            return "NO [ALREADYEXISTS] INBOX exists"
        try:
            await self.store.mailbox_create(self.account.id, name.rstrip("/"))
        except StoreError as exc:
            code = "[ALREADYEXISTS] " if "exists" in str(exc) else ""
            return f"NO {code}{exc}"
        return "OK CREATE completed"

    async def cmd_DELETE(self, tag: str, args: list) -> str:
        name = self._one_mailbox(args)
        if self.selected is not None and self.selected.name == name:
            self._deselect()
            self.state = "AUTHENTICATED"
        await self.store.mailbox_delete(self.account.id, name)
        return "OK DELETE completed"

    async def cmd_RENAME(self, tag: str, args: list) -> str:
        if len(args) != 2:
            raise p.ParseError("RENAME takes two mailbox names")
        old, new = _mailbox(args[0]), _mailbox(args[1], creating=True)
        await self.store.mailbox_rename(self.account.id, old, new)
        return "OK RENAME completed"

    async def cmd_SUBSCRIBE(self, tag: str, args: list, subscribed: bool = True) -> str:
        await self.store.mailbox_subscribe(self.account.id, self._one_mailbox(args), subscribed)
        return f"OK {'SUBSCRIBE' if subscribed else 'UNSUBSCRIBE'} completed"

    async def cmd_UNSUBSCRIBE(self, tag: str, args: list) -> str:
        return await self.cmd_SUBSCRIBE(tag, args, subscribed=False)

    async def cmd_LIST(self, tag: str, args: list, lsub: bool = False) -> str:
        verb = "LSUB" if lsub else "LIST"
        if len(args) < 2:
            raise p.ParseError(f"{verb} takes a reference and a pattern")
        reference, pattern = p.list_pattern(args[0]), p.list_pattern(args[1])
        if pattern == "":
            self.send(f'* {verb} (\\Noselect) "/" ""')
            return f"OK {verb} completed"
        matches = p.mailbox_pattern(reference, pattern)
        boxes = await self.store.mailbox_list(self.account.id)
        names = {box.name for box in boxes}
        if lsub:
            # Subscriptions are names; one whose mailbox is gone is listed \Noselect.
            for name in await self.store.subscriptions(self.account.id):
                if matches(name):
                    attribute = "" if name in names else "\\Noselect"
                    self.send(f'* LSUB ({attribute}) "/" {_mailbox_wire(name)}')
            return "OK LSUB completed"
        for box in boxes:
            if not matches(box.name):
                continue
            has_children = any(n.startswith(box.name + "/") for n in names)
            attributes = ["\\HasChildren" if has_children else "\\HasNoChildren"]
            if box.special_use:
                attributes.append(box.special_use)
            if box.subscribed:
                attributes.append("\\Subscribed")
            self.send(f'* {verb} ({" ".join(attributes)}) "/" {_mailbox_wire(box.name)}')
        return f"OK {verb} completed"

    async def cmd_LSUB(self, tag: str, args: list) -> str:
        return await self.cmd_LIST(tag, args, lsub=True)

    async def cmd_STATUS(self, tag: str, args: list) -> str:
        if len(args) != 2 or not isinstance(args[1], p.ParenList):
            raise p.ParseError("STATUS takes a mailbox and a list of items")
        name = _mailbox(args[0])
        wanted = [p.keyword(item) for item in args[1].items]
        status = await self.store.mailbox_status(self.account.id, name)
        values = {"MESSAGES": status.messages, "RECENT": status.recent,
                  "UIDNEXT": status.uidnext, "UIDVALIDITY": status.uidvalidity,
                  "UNSEEN": status.unseen}
        unknown = [w for w in wanted if w not in values]
        if unknown or not wanted:
            raise p.ParseError(f"unknown STATUS item {unknown[0] if unknown else ''}")
        items = " ".join(f"{w} {values[w]}" for w in wanted)
        self.send(f"* STATUS {_mailbox_wire(name)} ({items})")
        return "OK STATUS completed"

    async def cmd_APPEND(self, tag: str, args: list) -> str:
        if len(args) < 2:
            raise p.ParseError("APPEND takes a mailbox, optional flags and date, and a message")
        name = _mailbox(args[0])
        message = args[-1]
        if not isinstance(message, p.LiteralString):
            raise p.ParseError("the message must be a literal")
        flags: list[str] = []
        date = None
        for extra in args[1:-1]:
            if isinstance(extra, p.ParenList):
                flags = p.parse_flag_list(extra)
            else:
                date = p.parse_datetime(extra)
        flags = [f for f in flags if f != "\\Recent"]
        raw = message.value
        if not raw:
            return "NO empty message"
        structure = await self._in_thread(structure_of, raw)
        try:
            uidvalidity, uid = await self.store.append(self.account.id, name, raw,
                                                       " ".join(flags), date, structure)
        except NotFound:
            return "NO [TRYCREATE] no such mailbox"
        if self.selected is not None and self.selected.name == name:
            await self.sync(allow_expunge=False)
        return f"OK [APPENDUID {uidvalidity} {uid}] APPEND completed"

    # --- selected ------------------------------------------------------------------------
    async def cmd_CHECK(self, tag: str, args: list) -> str:
        _no_args(args)
        await self.sync(allow_expunge=True)
        return "OK CHECK completed"

    async def cmd_CLOSE(self, tag: str, args: list) -> str:
        _no_args(args)
        box = self.selected
        assert box is not None
        if not box.readonly:
            await self.store.expunge_deleted(box.id)  # silently (RFC 3501 6.4.2)
        self._deselect()
        self.state = "AUTHENTICATED"
        return "OK CLOSE completed"

    def cmd_UNSELECT(self, tag: str, args: list) -> str:
        _no_args(args)
        self._deselect()
        self.state = "AUTHENTICATED"
        return "OK UNSELECT completed"

    async def cmd_EXPUNGE(self, tag: str, args: list, uids: list[int] | None = None) -> str:
        if uids is None:
            _no_args(args)
        box = self._writable()
        removed = await self.store.expunge_deleted(box.id, uids)
        for line in box.remove(removed):
            self.send(line)
        await self.sync(allow_expunge=True)
        return "OK EXPUNGE completed"

    async def cmd_UID_EXPUNGE(self, tag: str, args: list) -> str:
        if len(args) != 1:
            raise p.ParseError("UID EXPUNGE takes a UID set")
        box = self._writable()
        uids = p.parse_sequence_set(args[0]).select(box.uids, box.uids[-1] if box.uids else 0)
        return await self.cmd_EXPUNGE(tag, args, uids=uids)

    async def cmd_SEARCH(self, tag: str, args: list, uid: bool = False) -> str:
        box = self.selected
        assert box is not None
        charset = None
        if len(args) >= 2 and isinstance(args[0], p.Atom) and args[0].upper() == "CHARSET":
            charset = p.astring(args[1]).decode("ascii", "replace")
            args = args[2:]
        try:
            key = searching.parse_search(args, charset)
        except searching.BadCharset:
            return "NO [BADCHARSET (UTF-8 US-ASCII)] unsupported charset"
        except searching.TooComplex as exc:
            return f"NO [LIMIT] {exc}"
        uids = box.live_uids(list(box.uids))
        deadline = time.monotonic() + self.config.imap.search_timeout
        found = await self._in_thread(self._search_blocking, box, uids, key, deadline)
        if found is None:
            return ("NO [LIMIT] search took longer than "
                    f"{self.config.imap.search_timeout:g} seconds; narrow it down")
        numbers = found if uid else [box.seq_of(u) for u in found]
        self.send("* SEARCH" + "".join(f" {n}" for n in numbers))
        await self.sync(allow_expunge=uid)
        return f"OK {'UID ' if uid else ''}SEARCH completed"

    async def cmd_UID_SEARCH(self, tag: str, args: list) -> str:
        return await self.cmd_SEARCH(tag, args, uid=True)

    def _search_blocking(self, box: Selected, uids: list[int], key: searching.SearchKey,
                         deadline: float) -> list[int] | None:
        """In a thread: the UIDs that match, or None once the deadline has passed.

        Each message is first tried on its metadata alone; only those a key needs to read are
        loaded, in batches of at most BATCH_BYTES (one bigger message alone), so one
        search holds a bounded number of octets whatever the mailbox's size.
        """
        store = self.store.store
        context = searching.SearchContext(max_seq=box.exists,
                                          max_uid=box.uids[-1] if box.uids else 0)
        found: list[int] = []
        for start in range(0, len(uids), FETCH_CHUNK):
            rows = store.fetch_rows(box.id, uids[start:start + FETCH_CHUNK], False, False)
            pending = []
            for row in rows:
                if time.monotonic() > deadline:  # a program of thousands of keys is slow too
                    return None
                try:
                    if searching.matches(key, self._search_message(box, row, _needs_bytes),
                                         context):
                        found.append(row.uid)
                except _NeedsBytes:
                    pending.append(row)
            for batch in _byte_batches(pending, BATCH_BYTES):
                if self.gone or time.monotonic() > deadline:
                    return None
                blobs = store.message_blobs(box.id, [row.uid for row in batch])
                for row in batch:
                    if row.uid not in blobs:
                        continue  # expunged meanwhile
                    if time.monotonic() > deadline:
                        return None
                    data = blobs.pop(row.uid)  # dropped as we go: the batch shrinks
                    message = self._search_message(box, row, lambda data=data: bytes(data))
                    if searching.matches(key, message, context):
                        found.append(row.uid)
            if self.gone or time.monotonic() > deadline:
                return None
        return sorted(found)

    @staticmethod
    def _search_message(box: Selected, row: Any,
                        raw: Callable[[], bytes]) -> searching.SearchMessage:
        return searching.SearchMessage(
            seq=box.seq_of(row.uid) or 0, uid=row.uid, flags=set(row.flags.split()),
            internal_date=row.internal_date, size=row.size, recent=row.uid in box.recent,
            raw=raw)

    async def cmd_FETCH(self, tag: str, args: list, uid: bool = False) -> str:
        box = self.selected
        assert box is not None
        if len(args) < 2:
            raise p.ParseError("FETCH takes a sequence set and items")
        wanted = self._resolve(args[0], uid)
        request = fetching.parse_items(args[1:], uid)
        uids = box.live_uids(wanted)
        mark_seen = request.sets_seen and not box.readonly
        if mark_seen and "FLAGS" not in request.items:
            # RFC 3501 6.4.5: the \Seen this FETCH sets is reported with it.
            request = fetching.FetchRequest([*request.items, "FLAGS"])
        self.transport.registerProducer(self._gate, True)
        try:
            async for chunk in self._fetch_chunks(box, uids, request.needs_raw):
                if mark_seen:
                    for changed_uid, flags in await self.store.store_flags(
                            box.id, chunk, "+", ["\\Seen"]):
                        box.flags[changed_uid] = flags
                rows = await self.store.fetch_rows(box.id, chunk, request.needs_raw,
                                                   request.needs_structure)
                lines = await self._in_thread(self._render_blocking, box, rows, request)
                if self.gone:
                    return "NO connection lost"
                self.transport.write(b"".join(lines))
                await self._gate.wait()
        finally:
            # Once the connection is lost there is nothing to unregister from, and doing so
            # anyway makes the TLS layer shut down a TLS connection it has already dropped.
            if not (self._lost or self._gate.stopped):
                self.transport.unregisterProducer()
        await self.sync(allow_expunge=uid)
        return f"OK {'UID ' if uid else ''}FETCH completed"

    async def _fetch_chunks(self, box: Selected, uids: list[int],
                            whole: bool) -> AsyncIterator[list[int]]:
        """The UIDs in groups to load at once: FETCH_CHUNK of them, and when whole messages
        are loaded, groups of at most BATCH_BYTES (one bigger message alone)."""
        for start in range(0, len(uids), FETCH_CHUNK):
            chunk = uids[start:start + FETCH_CHUNK]
            if not whole:
                yield chunk
                continue
            sizes = await self.store.fetch_rows(box.id, chunk, False, False)
            for batch in _byte_batches(sizes, BATCH_BYTES):
                yield [row.uid for row in batch]

    async def cmd_UID_FETCH(self, tag: str, args: list) -> str:
        return await self.cmd_FETCH(tag, args, uid=True)

    def _render_blocking(self, box: Selected, rows: list, request: Any) -> list[bytes]:
        """In a thread: MIME work for a chunk (structures missing from old rows are made)."""
        lines = []
        for row in rows:
            seq = box.seq_of(row.uid)
            if seq is None:
                continue
            structure = None
            if request.needs_structure:
                structure = row.structure
                if structure is None or structure[0] is None:
                    raw = row.raw
                    if raw is None:
                        [full] = self.store.store.fetch_rows(box.id, [row.uid], True, False)
                        raw = full.raw
                    structure = structure_of(raw or b"")
                    self.store.store.set_structure(box.id, row.uid, structure)
            lines.append(fetching.render(seq, row, request, box.flags.get(row.uid, row.flags),
                                         row.uid in box.recent, structure))
        return lines

    async def cmd_STORE(self, tag: str, args: list, uid: bool = False) -> str:
        box = self._writable()
        if len(args) != 3:
            raise p.ParseError("STORE takes a sequence set, an item and flags")
        uids = box.live_uids(self._resolve(args[0], uid))
        item = p.keyword(args[1])
        mode = {"FLAGS": "=", "+FLAGS": "+", "-FLAGS": "-"}.get(item.removesuffix(".SILENT"))
        if mode is None:
            raise p.ParseError(f"unknown STORE item {item}")
        flags = (p.parse_flag_list(args[2]) if isinstance(args[2], p.ParenList)
                 else [p.parse_flag(args[2])])
        flags = [f for f in flags if f != "\\Recent"]
        changed = dict(await self.store.store_flags(box.id, uids, mode, flags))
        for changed_uid, new_flags in changed.items():
            box.flags[changed_uid] = new_flags
            box.keywords |= {f for f in new_flags.split() if not f.startswith("\\")}
        if not item.endswith(".SILENT"):
            for message_uid in uids:
                seq = box.seq_of(message_uid)
                if seq is not None and message_uid in box.flags:
                    flags_text = flag_list(box.flags[message_uid], message_uid in box.recent)
                    uid_part = f"UID {message_uid} " if uid else ""
                    self.send(f"* {seq} FETCH ({uid_part}FLAGS {flags_text})")
        await self.sync(allow_expunge=uid)
        return f"OK {'UID ' if uid else ''}STORE completed"

    async def cmd_UID_STORE(self, tag: str, args: list) -> str:
        return await self.cmd_STORE(tag, args, uid=True)

    async def cmd_COPY(self, tag: str, args: list, uid: bool = False,
                       move: bool = False) -> str:
        box = self._writable() if move else self.selected
        assert box is not None
        if len(args) != 2:
            raise p.ParseError("COPY takes a sequence set and a mailbox")
        uids = box.live_uids(self._resolve(args[0], uid))
        target = _mailbox(args[1])
        verb = ("UID " if uid else "") + ("MOVE" if move else "COPY")
        try:
            uidvalidity, pairs = await self.store.copy_messages(box.id, uids, self.account.id,
                                                                target, move)
        except NotFound:
            return "NO [TRYCREATE] no such mailbox"
        if not pairs:
            return f"OK {verb} completed (no messages)"
        source_set = p.SequenceSet.from_values(src for src, _ in pairs)
        target_set = p.SequenceSet.from_values(dst for _, dst in pairs)
        code = f"[COPYUID {uidvalidity} {source_set} {target_set}]"
        if move:  # RFC 6851 4.3: COPYUID comes untagged, before the EXPUNGEs
            self.send(f"* OK {code} moved")
            for line in box.remove([src for src, _ in pairs]):
                self.send(line)
            await self.sync(allow_expunge=True)
            return f"OK {verb} completed"
        await self.sync(allow_expunge=uid)
        return f"OK {code} {verb} completed"

    async def cmd_UID_COPY(self, tag: str, args: list) -> str:
        return await self.cmd_COPY(tag, args, uid=True)

    async def cmd_MOVE(self, tag: str, args: list) -> str:
        return await self.cmd_COPY(tag, args, move=True)

    async def cmd_UID_MOVE(self, tag: str, args: list) -> str:
        return await self.cmd_COPY(tag, args, uid=True, move=True)

    # --- IDLE (RFC 2177) -----------------------------------------------------------------
    async def cmd_IDLE(self, tag: str, args: list) -> None:
        _no_args(args)
        self._idle_tag = tag
        self.setTimeout(self.config.imap.idle_timeout)
        self.send("+ idling")
        await self.sync(allow_expunge=True)

    def _idle_line(self, line: bytes) -> None:
        if line.strip().upper() != b"DONE":
            self.send("* BAD expected DONE")
            return
        tag, self._idle_tag = self._idle_tag, None
        self.send(f"{tag} OK IDLE terminated")

    def _stop_idle(self) -> None:
        if self.selected is not None:
            self.factory.notifier.unwatch(self.selected.id, self._mailbox_changed)

    def _mailbox_changed(self) -> None:
        """The store says our mailbox changed; an idling client hears about it at once."""
        if self._idle_tag is not None and not self.gone:
            defer.ensureDeferred(self.sync(allow_expunge=True)).addErrback(
                lambda f: log.failure("IDLE update failed", failure=f))

    # --- helpers -------------------------------------------------------------------------
    async def sync(self, allow_expunge: bool) -> None:
        """Tell the client what other sessions changed in the selected mailbox."""
        box = self.selected
        if box is None:
            return
        if self._syncing:
            self._sync_again = True  # a change arrived while we looked: look once more
            return
        self._syncing = True
        try:
            known_count = -1 if box.gone else len(box.uids)  # -1: always list the UIDs
            changes = await self.store.mailbox_changes(box.id, box.highestmodseq,
                                                       known_count, box.uidnext)
            if changes is not None and self.selected is box:
                for line in box.apply(changes, allow_expunge):
                    self.send(line)
            elif allow_expunge:
                for line in box.announce_expunged():
                    self.send(line)
        finally:
            self._syncing = False
        if self._sync_again:
            self._sync_again = False
            await self.sync(allow_expunge or self._idle_tag is not None)

    def _deselect(self) -> None:
        if self.selected is not None:
            self.factory.notifier.unwatch(self.selected.id, self._mailbox_changed)
            self.selected = None

    def _writable(self) -> Selected:
        box = self.selected
        assert box is not None
        if box.readonly:
            raise IMAPError("NO", "[READ-ONLY] the mailbox is selected read-only")
        return box

    def _one_mailbox(self, args: list, creating: bool = False) -> str:
        if len(args) != 1:
            raise p.ParseError("expected one mailbox name")
        return _mailbox(args[0], creating)

    def _resolve(self, token: Any, uid: bool) -> list[int]:
        """The UIDs a sequence set (or UID set) names, as ranges: never expanded blindly."""
        box = self.selected
        assert box is not None
        numbers = p.parse_sequence_set(token)
        if uid:
            return numbers.select(box.uids, box.uids[-1] if box.uids else 0)
        ranges = numbers.resolve(box.exists)
        if box.exists == 0 or any(high > box.exists for _, high in ranges):
            raise IMAPError("BAD", "message sequence number out of range")
        positions = numbers.select(range(1, box.exists + 1), box.exists)
        return [box.uids[i - 1] for i in positions]

    def _in_thread(self, fn: Callable, *args: Any) -> defer.Deferred:
        reactor = self.factory.reactor
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


# Which commands each state accepts (RFC 3501 6).
_ANY = ("NOT_AUTHENTICATED", "AUTHENTICATED", "SELECTED")
_AUTH = ("AUTHENTICATED", "SELECTED")
_STATES: dict[str, tuple[str, ...]] = {
    "CAPABILITY": _ANY, "NOOP": _ANY, "LOGOUT": _ANY, "ID": _ANY,
    "STARTTLS": ("NOT_AUTHENTICATED",), "LOGIN": ("NOT_AUTHENTICATED",),
    "AUTHENTICATE": ("NOT_AUTHENTICATED",),
    **{name: _AUTH for name in ("ENABLE", "NAMESPACE", "SELECT", "EXAMINE", "CREATE",
                                "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST",
                                "LSUB", "STATUS", "APPEND", "IDLE")},
    **{name: ("SELECTED",) for name in ("CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH",
                                        "FETCH", "STORE", "COPY", "MOVE")},
}


class _NeedsBytes(Exception):
    """A search key needs the message's octets, which are not loaded yet."""


def _needs_bytes() -> bytes:
    raise _NeedsBytes


def _byte_batches(rows: list, budget: int) -> Iterator[list]:
    """The rows in order, grouped so that each group's sizes add up to at most the budget."""
    batch: list = []
    total = 0
    for row in rows:
        if batch and total + row.size > budget:
            yield batch
            batch, total = [], 0
        batch.append(row)
        total += row.size
    if batch:
        yield batch


def _no_args(args: list) -> None:
    if args:
        raise p.ParseError("this command takes no arguments")


_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')


def _guess_tag(line: bytes) -> str:
    """The tag to answer a broken command with; "*" when it has no valid tag."""
    word = line.split(b" ", 1)[0]
    return word.decode("ascii") if _TAG.fullmatch(word) else "*"


def _guess_name(line: bytes) -> str:
    words = line.split(b" ", 3)
    if len(words) > 2 and words[1].upper() == b"UID":
        return words[2].decode("ascii", "replace").upper()
    return words[1].decode("ascii", "replace").upper() if len(words) > 1 else ""


def _mailbox(token: Any, creating: bool = False) -> str:
    """A mailbox argument, decoded. A name that no mailbox can have gets NO: [CANNOT] when it
    is to be created (CREATE, RENAME's new name), else [NONEXISTENT], which it is."""
    try:
        name = p.mailbox_name(token)
    except p.MailboxNameError as exc:
        reason = str(exc)
    else:
        reason = _reserved(name)
        if reason is None:
            return name
    raise IMAPError("NO", f"[{'CANNOT' if creating else 'NONEXISTENT'}] {reason}")


def _reserved(name: str) -> str | None:
    """Why a decoded name can be no mailbox's, or None. "#" starts a namespace and "~" another
    user's folders (RFC 2342, as Dovecot and UW read them); "." and ".." are path steps that
    no client means as a folder name and that file-based tools would follow."""
    if name[:1] in ("#", "~"):
        return f"mailbox names may not start with {name[0]!r}"
    if any(part in (".", "..") for part in name.split("/")):
        return 'mailbox names may not have "." or ".." as a level'
    return None


def _mailbox_wire(name: str) -> str:
    return p.quote(encode_mailbox(name))

