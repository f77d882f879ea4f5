"""The mail store's tables (SQLAlchemy Core), identical on PostgreSQL and SQLite.

This is the schema as the code expects it now; migrations/versions/ builds it step by step.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only autoincrements INTEGER PRIMARY KEY; BigInteger elsewhere.
Id = BigInteger().with_variant(Integer(), "sqlite")

# The special-use folders (RFC 6154) every account starts with, in display order.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)

domains = Table(
    "domains",
    metadata,
    Column("id", Id, primary_key=True),
    Column("name", String(253), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("api_id", String(40), nullable=True),  # dom_<ulid>; set on every row
    Column("verified_at", DateTime(timezone=True), nullable=True),  # its DNS records checked out
    Index("ix_domains_api_id", "api_id", unique=True),
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", Id, primary_key=True),
    Column("domain_id", Id, ForeignKey("domains.id", ondelete="RESTRICT"), nullable=False),
    Column("address", String(320), nullable=False, unique=True),  # lower-cased local@domain
    Column("password_hash", String(100), nullable=False),
    Column("quota_bytes", BigInteger, nullable=True),
    # The last UIDVALIDITY given to any of its mailboxes: a new one is always larger.
    Column("last_uidvalidity", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("api_id", String(40), nullable=True),  # inb_<ulid>; set on every row
    Column("display_name", String(200), nullable=True),
    Index("ix_accounts_api_id", "api_id", unique=True),
)

mailboxes = Table(
    "mailboxes",
    metadata,
    Column("id", Id, primary_key=True),
    Column("account_id", Id, ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(1000), nullable=False),
    Column("special_use", String(20), nullable=True),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uidnext", BigInteger, nullable=False, default=1),
    Column("highestmodseq", BigInteger, nullable=False, default=1),
    # Messages above this UID are \Recent for the next session that SELECTs (RFC 3501 2.3.2).
    Column("recent_uid", BigInteger, nullable=False, default=0),
    UniqueConstraint("account_id", "name", name="uq_mailboxes_account_name"),
)

# IMAP subscriptions are names, not mailboxes: they outlive a DELETE (RFC 3501 6.3.6).
subscriptions = Table(
    "subscriptions",
    metadata,
    Column("account_id", Id, ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(1000), primary_key=True),
)

blobs = Table(
    "blobs",
    metadata,
    Column("id", Id, primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Index("ix_blobs_sha256", "sha256"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True),
    Column("mailbox_id", Id, ForeignKey("mailboxes.id", ondelete="CASCADE"), nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("modseq", BigInteger, nullable=False),
    Column("flags", Text, nullable=False, default=""),  # space-separated, e.g. "\\Seen $Label1"
    Column("internal_date", DateTime(timezone=True), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("blob_id", Id, ForeignKey("blobs.id", ondelete="RESTRICT"), nullable=False),
    # IMAP ENVELOPE, BODYSTRUCTURE and BODY, computed once when the message arrives.
    Column("envelope", LargeBinary, nullable=True),
    Column("bodystructure", LargeBinary, nullable=True),
    Column("body", LargeBinary, nullable=True),
    UniqueConstraint("mailbox_id", "uid", name="uq_messages_mailbox_uid"),
    Index("ix_messages_blob", "blob_id"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("id", Id, primary_key=True),
    Column("domain_id", Id, ForeignKey("domains.id", ondelete="CASCADE"), nullable=False),
    Column("source", String(320), nullable=False),  # "local@domain", or "@domain" for a catch-all
    Column("destination", String(320), nullable=False),
    Column("api_id", String(40), nullable=True),  # ali_<ulid>, shared by a source's rows
    UniqueConstraint("source", "destination", name="uq_aliases_source_destination"),
    Index("ix_aliases_source", "source"),
    Index("ix_aliases_api_id", "api_id"),
)

events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("kind", String(32), nullable=False),  # received, rejected, ...
    Column("account_id", Id, ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True),
    Column("detail", Text, nullable=False),  # JSON
    Index("ix_events_account", "account_id", "id"),
)

# Leases that must hold across processes sharing one database (the POP3 maildrop lock).
locks = Table(
    "locks",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# DKIM signing keys; the newest active key of each algorithm signs (RFC 6376, RFC 8463).
dkim_keys = Table(
    "dkim_keys",
    metadata,
    Column("id", Id, primary_key=True),
    Column("domain_id", Id, ForeignKey("domains.id", ondelete="CASCADE"), nullable=False),
    Column("selector", String(63), nullable=False),
    Column("algorithm", String(20), nullable=False),  # rsa-sha256 or ed25519-sha256
    Column("private_key", LargeBinary, nullable=False),  # PKCS#8 PEM
    Column("active", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("domain_id", "selector", name="uq_dkim_keys_domain_selector"),
)

# Domains an account may use as sender besides its own address and its aliases.
send_grants = Table(
    "send_grants",
    metadata,
    Column("account_id", Id, ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True),
    Column("domain", String(253), primary_key=True),
)

# Addresses that hard-bounced: submission refuses them until an operator clears them.
suppressions = Table(
    "suppressions",
    metadata,
    Column("address", String(320), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Values every process must share, made once (the SRS secret).
settings = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# The outbound queue: each message once, and each recipient's own state. A message leaves
# the queue when every recipient is final; its history stays in events.
outbound = Table(
    "outbound",
    metadata,
    Column("id", Id, primary_key=True),
    Column("queue_id", String(32), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("account_id", Id, ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True),
    Column("kind", String(16), nullable=False),  # submission, forward, bounce
    Column("sender", String(1000), nullable=False),  # MAIL FROM on the wire; SRS makes it long
    Column("return_to", String(320), nullable=False),  # where a DSN goes; "" for nobody
    Column("smtputf8", Boolean, nullable=False),
    Column("eightbit", Boolean, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),  # exactly the bytes sent (signed)
)

outbound_recipients = Table(
    "outbound_recipients",
    metadata,
    Column("id", Id, primary_key=True),
    Column("outbound_id", Id, ForeignKey("outbound.id", ondelete="CASCADE"), nullable=False),
    Column("recipient", String(320), nullable=False),
    Column("domain", String(253), nullable=False),
    Column("state", String(16), nullable=False),  # queued, deferred (final ones are deleted)
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_attempt_at", DateTime(timezone=True), nullable=True),
    Column("last_reply", Text, nullable=True),
    Column("claimed_by", String(64), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    Index("ix_outbound_recipients_due", "next_attempt_at"),
    Index("ix_outbound_recipients_outbound", "outbound_id"),
)

# API keys. The secret is not kept, only its SHA-256; restrictions are names, so a key
# restricted to a domain never widens to everything when that domain goes away.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),  # key_<ulid>
    Column("name", String(200), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("scopes", Text, nullable=False),  # space-separated
    Column("domains", Text, nullable=False),  # space-separated domain names, "" for any
    Column("inboxes", Text, nullable=False),  # space-separated addresses, "" for any
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# Idempotency-Key answers of the HTTP API, per API key, replayed for 24 hours.
idempotency = Table(
    "idempotency",
    metadata,
    Column("api_key_id", String(40), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),  # SHA-256 of method, path and body
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("status", Integer, nullable=True),  # None while the first request runs
    Column("body", LargeBinary, nullable=True),
)
