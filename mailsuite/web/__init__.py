"""The HTTP API: the same store as SMTP, IMAP and POP3, for apps and agents.

It imports the store and protocol-neutral modules, never smtp/, imap/ or pop3/.
"""
