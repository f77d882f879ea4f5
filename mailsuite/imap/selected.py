"""The selected mailbox as one IMAP session sees it: sequence numbers, flags, pending news.

Sequence numbers are positions in `uids`. Changes made by other sessions arrive as
MailboxChanges; they are turned into untagged EXISTS, EXPUNGE and FETCH responses only at
the points RFC 3501 7.4.1 allows (no EXPUNGE during FETCH, STORE or SEARCH), so the numbers a
client holds stay right.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mailsuite.store import MailboxChanges, MailboxSnapshot


def flag_list(flags: str, recent: bool = False) -> str:
    words = flags.split()
    if recent:
        words.append("\\Recent")
    return "(" + " ".join(words) + ")"


@dataclass
class Selected:
    id: int
    name: str
    readonly: bool
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: list[int]
    flags: dict[int, str]
    recent: set[int]
    keywords: set[str]
    gone: set[int] = field(default_factory=set)  # expunged elsewhere, not yet announced

    @classmethod
    def from_snapshot(cls, snap: MailboxSnapshot, readonly: bool) -> Selected:
        return cls(id=snap.id, name=snap.name, readonly=readonly,
                   uidvalidity=snap.uidvalidity, uidnext=snap.uidnext,
                   highestmodseq=snap.highestmodseq, uids=list(snap.uids),
                   flags=dict(zip(snap.uids, snap.flags, strict=True)),
                   recent=set(snap.recent), keywords=set(snap.keywords))

    @property
    def exists(self) -> int:
        return len(self.uids)

    def seq_of(self, uid: int) -> int | None:
        index = bisect.bisect_left(self.uids, uid)
        if index < len(self.uids) and self.uids[index] == uid:
            return index + 1
        return None

    def live_uids(self, uids: list[int]) -> list[int]:
        """Those of `uids` not known to be expunged."""
        return [uid for uid in uids if uid not in self.gone]

    def apply(self, changes: MailboxChanges, allow_expunge: bool) -> list[str]:
        """Take in what changed; the untagged responses to send now (without CRLF)."""
        out: list[str] = []
        self.highestmodseq = changes.highestmodseq
        latest = dict(changes.flag_changes)
        new: list[int] = []
        if changes.uids is not None:
            present = set(changes.uids)
            self.gone |= {uid for uid in self.uids if uid not in present}
            known = set(self.uids)
            new = [uid for uid in changes.uids if uid not in known and uid >= self.uidnext]
            if new:
                self.uids.extend(sorted(new))
                self.uidnext = max(new) + 1
                for uid in new:
                    self.flags[uid] = latest.get(uid, "")
                    self.keywords |= {f for f in self.flags[uid].split()
                                      if not f.startswith("\\")}
                out.append(f"* {len(self.uids)} EXISTS")
        fresh = set(new)
        for uid, flags in changes.flag_changes:
            if uid in fresh:
                continue  # the client asks for a new message's flags when it wants them
            if uid in self.flags and uid not in self.gone and self.flags[uid] != flags:
                self.flags[uid] = flags
                self.keywords |= {f for f in flags.split() if not f.startswith("\\")}
                seq = self.seq_of(uid)
                out.append(f"* {seq} FETCH (UID {uid} FLAGS "
                           f"{flag_list(flags, uid in self.recent)})")
        if allow_expunge:
            out.extend(self.announce_expunged())
        return out

    def announce_expunged(self) -> list[str]:
        """EXPUNGE responses for everything gone, highest first so each number stays valid."""
        out = []
        for uid in sorted(self.gone, reverse=True):
            seq = self.seq_of(uid)
            if seq is not None:
                out.append(f"* {seq} EXPUNGE")
                del self.uids[seq - 1]
                self.flags.pop(uid, None)
                self.recent.discard(uid)
        self.gone.clear()
        return out

    def remove(self, uids: list[int]) -> list[str]:
        """This session expunged (or moved away) `uids`: announce and forget them."""
        self.gone |= set(uids)
        return self.announce_expunged()
