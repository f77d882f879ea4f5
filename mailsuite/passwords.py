"""Password hashing with bcrypt. Blocking: the server calls these in a thread."""

from __future__ import annotations

import functools
import secrets

import bcrypt

# bcrypt only reads the first 72 bytes; longer passwords are refused rather than truncated.
MAX_PASSWORD_BYTES = 72


class PasswordError(ValueError):
    pass


def hash_password(password: str, rounds: int = 12) -> str:
    data = password.encode("utf-8")
    if not data:
        raise PasswordError("empty password")
    if len(data) > MAX_PASSWORD_BYTES:
        raise PasswordError(f"password longer than {MAX_PASSWORD_BYTES} bytes")
    return bcrypt.hashpw(data, bcrypt.gensalt(rounds)).decode("ascii")


def check_password(password: str, hashed: str) -> bool:
    data = password.encode("utf-8")
    if not data or len(data) > MAX_PASSWORD_BYTES:
        return False
    try:
        return bcrypt.checkpw(data, hashed.encode("ascii"))
    except ValueError:
        return False


@functools.cache
def dummy_hash(rounds: int) -> str:
    """A hash of no one's password at `rounds`: checked for unknown users, so that they take
    as long as known ones and cannot be told apart by timing."""
    return hash_password(secrets.token_urlsafe(16), rounds)
