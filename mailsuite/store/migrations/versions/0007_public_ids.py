"""Public ids for domains, accounts and aliases (the API's dom_, inb_ and ali_ ids), display
names, and when a domain's DNS records were verified.

Revision ID: 0007
Revises: 0006
"""

from datetime import datetime

import sqlalchemy as sa
from alembic import op

from mailsuite.ids import new_id

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("domains", sa.Column("api_id", sa.String(40), nullable=True))
    op.add_column("domains", sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("accounts", sa.Column("api_id", sa.String(40), nullable=True))
    op.add_column("accounts", sa.Column("display_name", sa.String(200), nullable=True))
    op.add_column("aliases", sa.Column("api_id", sa.String(40), nullable=True))
    conn = op.get_bind()
    # Existing rows get ids from their creation time, so the API's order is creation order.
    for table, prefix in (("domains", "dom"), ("accounts", "inb")):
        rows = conn.execute(sa.text(f"SELECT id, created_at FROM {table}")).all()
        for row_id, created_at in rows:
            # SQLite hands raw SQL its ISO text; PostgreSQL a datetime.
            when = datetime.fromisoformat(created_at) if isinstance(created_at, str) else created_at
            conn.execute(sa.text(f"UPDATE {table} SET api_id = :api_id WHERE id = :id"),
                         {"api_id": new_id(prefix, when), "id": row_id})
    # An alias is its source: every destination row of one source shares its id.
    for (source,) in conn.execute(sa.text("SELECT DISTINCT source FROM aliases")).all():
        conn.execute(sa.text("UPDATE aliases SET api_id = :api_id WHERE source = :source"),
                     {"api_id": new_id("ali"), "source": source})
    op.create_index("ix_domains_api_id", "domains", ["api_id"], unique=True)
    op.create_index("ix_accounts_api_id", "accounts", ["api_id"], unique=True)
    op.create_index("ix_aliases_api_id", "aliases", ["api_id"])


def downgrade() -> None:
    op.drop_index("ix_aliases_api_id", "aliases")
    op.drop_index("ix_accounts_api_id", "accounts")
    op.drop_index("ix_domains_api_id", "domains")
    for table, column in (("aliases", "api_id"), ("accounts", "display_name"),
                          ("accounts", "api_id"),
                          ("domains", "verified_at"), ("domains", "api_id")):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
