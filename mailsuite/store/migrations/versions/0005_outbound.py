"""Submission and the outbound queue: DKIM keys, send grants, suppressions, settings, queue.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "dkim_keys",
        sa.Column("id", Id, primary_key=True),
        sa.Column("domain_id", Id, sa.ForeignKey("domains.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("selector", sa.String(63), nullable=False),
        sa.Column("algorithm", sa.String(20), nullable=False),
        sa.Column("private_key", sa.LargeBinary, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("domain_id", "selector", name="uq_dkim_keys_domain_selector"),
    )
    op.create_table(
        "send_grants",
        sa.Column("account_id", Id, sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("domain", sa.String(253), primary_key=True),
    )
    op.create_table(
        "suppressions",
        sa.Column("address", sa.String(320), primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "outbound",
        sa.Column("id", Id, primary_key=True),
        sa.Column("queue_id", sa.String(32), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("account_id", Id, sa.ForeignKey("accounts.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("sender", sa.String(1000), nullable=False),
        sa.Column("return_to", sa.String(320), nullable=False),
        sa.Column("smtputf8", sa.Boolean, nullable=False),
        sa.Column("eightbit", sa.Boolean, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "outbound_recipients",
        sa.Column("id", Id, primary_key=True),
        sa.Column("outbound_id", Id, sa.ForeignKey("outbound.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("domain", sa.String(253), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_reply", sa.Text, nullable=True),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_outbound_recipients_due", "outbound_recipients", ["next_attempt_at"])
    op.create_index("ix_outbound_recipients_outbound", "outbound_recipients", ["outbound_id"])


def downgrade() -> None:
    for table in ("outbound_recipients", "outbound", "settings", "suppressions", "send_grants",
                  "dkim_keys"):
        op.drop_table(table)
