"""Subscriptions apart from mailboxes (they outlive a DELETE, RFC 3501 6.3.6), and a
per-account UIDVALIDITY high-water mark (a re-created mailbox never reuses one).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("account_id", Id, sa.ForeignKey("accounts.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("name", sa.String(1000), primary_key=True),
    )
    op.execute("INSERT INTO subscriptions (account_id, name) "
               "SELECT account_id, name FROM mailboxes WHERE subscribed")
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_column("subscribed")
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("last_uidvalidity", sa.BigInteger, nullable=False,
                                   server_default="0"))
    op.execute("UPDATE accounts SET last_uidvalidity = COALESCE((SELECT MAX(uidvalidity) "
               "FROM mailboxes WHERE mailboxes.account_id = accounts.id), 0)")


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("last_uidvalidity")
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("subscribed", sa.Boolean, nullable=False,
                                   server_default=sa.true()))
    op.drop_table("subscriptions")
