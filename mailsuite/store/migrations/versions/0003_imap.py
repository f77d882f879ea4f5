"""IMAP: cached ENVELOPE/BODYSTRUCTURE per message, and the \\Recent boundary per mailbox.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("envelope", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("bodystructure", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("body", sa.LargeBinary, nullable=True))
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("recent_uid", sa.BigInteger, nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_column("recent_uid")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("body")
        batch.drop_column("bodystructure")
        batch.drop_column("envelope")
