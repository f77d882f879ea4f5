"""The backbone schema: domains, accounts, mailboxes, blobs, messages, aliases, events.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Stamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "domains",
        sa.Column("id", Id, primary_key=True),
        sa.Column("name", sa.String(253), nullable=False, unique=True),
        sa.Column("created_at", Stamp, nullable=False),
    )
    op.create_table(
        "accounts",
        sa.Column("id", Id, primary_key=True),
        sa.Column("domain_id", Id, sa.ForeignKey("domains.id", ondelete="RESTRICT"),
                  nullable=False),
        sa.Column("address", sa.String(320), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(100), nullable=False),
        sa.Column("quota_bytes", sa.BigInteger, nullable=True),
        sa.Column("created_at", Stamp, nullable=False),
    )
    op.create_table(
        "mailboxes",
        sa.Column("id", Id, primary_key=True),
        sa.Column("account_id", Id, sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(1000), nullable=False),
        sa.Column("special_use", sa.String(20), nullable=True),
        sa.Column("uidvalidity", sa.BigInteger, nullable=False),
        sa.Column("uidnext", sa.BigInteger, nullable=False),
        sa.Column("highestmodseq", sa.BigInteger, nullable=False),
        sa.Column("subscribed", sa.Boolean, nullable=False),
        sa.UniqueConstraint("account_id", "name", name="uq_mailboxes_account_name"),
    )
    op.create_table(
        "blobs",
        sa.Column("id", Id, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_blobs_sha256", "blobs", ["sha256"])
    op.create_table(
        "messages",
        sa.Column("id", Id, primary_key=True),
        sa.Column("mailbox_id", Id, sa.ForeignKey("mailboxes.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("uid", sa.BigInteger, nullable=False),
        sa.Column("modseq", sa.BigInteger, nullable=False),
        sa.Column("flags", sa.Text, nullable=False),
        sa.Column("internal_date", Stamp, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("blob_id", Id, sa.ForeignKey("blobs.id", ondelete="RESTRICT"), nullable=False),
        sa.UniqueConstraint("mailbox_id", "uid", name="uq_messages_mailbox_uid"),
    )
    op.create_index("ix_messages_blob", "messages", ["blob_id"])
    op.create_table(
        "aliases",
        sa.Column("id", Id, primary_key=True),
        sa.Column("domain_id", Id, sa.ForeignKey("domains.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("source", sa.String(320), nullable=False),
        sa.Column("destination", sa.String(320), nullable=False),
        sa.UniqueConstraint("source", "destination", name="uq_aliases_source_destination"),
    )
    op.create_index("ix_aliases_source", "aliases", ["source"])
    op.create_table(
        "events",
        sa.Column("id", Id, primary_key=True),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("account_id", Id, sa.ForeignKey("accounts.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_events_account", "events", ["account_id", "id"])


def downgrade() -> None:
    for table in ("events", "aliases", "messages", "blobs", "mailboxes", "accounts", "domains"):
        op.drop_table(table)
