"""Prefixed, time-sortable public ids (ULIDs), such as dom_01jf... for the API's resources."""

from __future__ import annotations

from datetime import datetime

from ulid import ULID


def new_id(prefix: str, when: datetime | None = None) -> str:
    """`prefix` + "_" + a lower-case ULID; ids made later sort after earlier ones."""
    ulid = ULID.from_datetime(when) if when is not None else ULID()
    return f"{prefix}_{str(ulid).lower()}"
