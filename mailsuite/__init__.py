"""mailsuite: a self-hosted mail server suite on Twisted over one shared mail store."""

__version__ = "0.1.0"
