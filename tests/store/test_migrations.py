"""Migrations that move data: what was stored before them is carried over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import text

from mailsuite.store import open_store
from mailsuite.store.engine import Database
from tests.store.test_uids import MIGRATIONS


def upgrade(db: Database, revision: str) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.connect() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
        conn.commit()


def test_0007_gives_existing_domains_accounts_and_aliases_ids(db_url: str) -> None:
    db = Database(db_url, pool_size=2)
    upgrade(db, "0006")
    early = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    with db.engine.begin() as conn:
        for n, name in enumerate(("later.test", "earlier.test")):
            conn.execute(text("INSERT INTO domains (name, created_at) VALUES (:n, :c)"),
                         {"n": name, "c": early + timedelta(days=1 - n)})
        domain_id = conn.scalar(text("SELECT id FROM domains WHERE name = 'earlier.test'"))
        conn.execute(text("INSERT INTO accounts (domain_id, address, password_hash, "
                          "last_uidvalidity, created_at) VALUES (:d, 'old@earlier.test', "
                          "'!', 0, :c)"), {"d": domain_id, "c": early})
        for destination in ("old@earlier.test", "out@elsewhere.test"):
            conn.execute(text("INSERT INTO aliases (domain_id, source, destination) VALUES "
                              "(:d, 'team@earlier.test', :dest)"),
                         {"d": domain_id, "dest": destination})
    db.dispose()

    store = open_store(db_url, pool_size=2)
    try:
        earlier, later = store.domain_find("earlier.test"), store.domain_find("later.test")
        assert earlier is not None and later is not None
        assert earlier.api_id.startswith("dom_") and earlier.api_id < later.api_id
        assert store.domain_find(earlier.api_id) == earlier
        inbox = store.inbox_find("old@earlier.test")
        assert inbox is not None and inbox.api_id.startswith("inb_")
        assert store.inbox_find(inbox.api_id) == inbox
        assert store.domain_add("new.test").api_id > later.api_id
        alias = store.alias_find("team@earlier.test")
        assert alias is not None and alias.api_id.startswith("ali_")
        assert alias.destinations == ("old@earlier.test", "out@elsewhere.test")
        assert store.alias_find(alias.api_id) == alias
    finally:
        store.close()
