"""IMAP4rev1 over the shared store: server.py holds the protocol."""
