"""Modified UTF-7 for IMAP mailbox names (RFC 3501 5.1.3).

Printable US-ASCII (0x20-0x7e) stands for itself, except "&", which is written "&-".
Everything else is UTF-16BE in a modified BASE64 ("," instead of "/", no "=" padding)
between "&" and "-".

The decoder is strict: a name has exactly one valid wire form, so that two different wire
strings never open the same mailbox and a client cannot smuggle printable ASCII (such as the
hierarchy delimiter "/") past checks made on the wire form.
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["encode_mailbox", "decode_mailbox"]

# The modified BASE64 alphabet: RFC 2045 BASE64 with "," in place of "/".
_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def _printable(ch: str) -> bool:
    return "\x20" <= ch <= "\x7e"


def encode_mailbox(name: str) -> str:
    """The modified UTF-7 wire form of a mailbox name.

    Raises UnicodeEncodeError (a ValueError) for strings holding lone surrogates, which have
    no UTF-16 form.
    """
    out: list[str] = []
    run: list[str] = []  # pending characters that need the BASE64 shift

    def flush() -> None:
        if run:
            data = "".join(run).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode("ascii").rstrip("=")
                       .replace("/", ",") + "-")
            run.clear()

    for ch in name:
        if _printable(ch):
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            # Consecutive non-printable characters share one shift: RFC 3501 asks encoders
            # not to close and reopen a shift between them.
            run.append(ch)
    flush()
    return "".join(out)


def decode_mailbox(wire: str) -> str:
    """The mailbox name a modified UTF-7 wire form stands for.

    Raises ValueError for anything that is not the canonical encoding of some name: raw
    characters outside 0x20-0x7e, an "&" without its closing "-", characters outside the
    modified BASE64 alphabet, superfluous BASE64 characters or non-zero padding bits,
    incomplete or unpaired UTF-16 surrogates, shifted printable ASCII (including "&",
    which must be "&-"), and two shifts in a row (which the encoder writes as one).
    """
    out: list[str] = []
    i = 0
    n = len(wire)
    shift_end = -1  # where the last non-empty shift ended
    while i < n:
        ch = wire[i]
        if not _printable(ch):
            raise ValueError(f"character U+{ord(ch):04X} must be BASE64-encoded at offset {i}")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = wire.find("-", i + 1)
        if end < 0:
            raise ValueError(f'"&" at offset {i} is not closed by "-"')
        if end == i + 1:
            out.append("&")  # "&-" is the escaped "&" (the zero-length shift)
        else:
            if i == shift_end:
                # "&AMk-&AMk-" is "&AMkAyQ-" split in two: RFC 3501 5.1.3 has encoders join
                # such runs, so only the joined form is the name's wire form.
                raise ValueError(f"a shift at offset {i} directly follows another one")
            out.append(_decode_shifted(wire[i + 1:end], i))
            shift_end = end + 1
        i = end + 1
    return "".join(out)


def _decode_shifted(chars: str, offset: int) -> str:
    bad = next((c for c in chars if c not in _B64_CHARS), None)
    if bad is not None:
        raise ValueError(f"{bad!r} is not modified BASE64 in the shift at offset {offset}")
    bits = 6 * len(chars)
    leftover = bits % 16
    # Fewer than 6 bits left over are padding; 6 or more mean a superfluous BASE64 character
    # (a truncated UTF-16 code unit), which no encoder produces.
    if leftover >= 6:
        raise ValueError(f"truncated UTF-16 in the shift at offset {offset}")
    last = _b64_value(chars[-1])
    if last & ((1 << leftover) - 1):
        raise ValueError(f"non-zero padding bits in the shift at offset {offset}")
    std = chars.replace(",", "/")
    std += "=" * (-len(std) % 4)
    try:
        data = base64.b64decode(std, validate=True)
    except binascii.Error as exc:  # cannot happen after the checks above; kept for safety
        raise ValueError(f"bad BASE64 in the shift at offset {offset}") from exc
    data = data[: bits // 16 * 2]
    try:
        text = data.decode("utf-16-be")  # strict: rejects unpaired surrogates
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-16 in the shift at offset {offset}") from exc
    if any(_printable(c) for c in text):
        raise ValueError(f"printable US-ASCII is BASE64-encoded in the shift at offset {offset}")
    return text


def _b64_value(ch: str) -> int:
    if "A" <= ch <= "Z":
        return ord(ch) - ord("A")
    if "a" <= ch <= "z":
        return ord(ch) - ord("a") + 26
    if "0" <= ch <= "9":
        return ord(ch) - ord("0") + 52
    return 62 if ch == "+" else 63
