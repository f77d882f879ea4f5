"""SMTP: the shared ESMTP server (server.py), the inbound MX (mx.py) and its checks."""
