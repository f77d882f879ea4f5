"""Errors the store raises for the caller to turn into a protocol reply or a CLI message."""


class StoreError(Exception):
    """Base class; the message is fit to show an operator."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    """The thing exists already."""


class InUse(StoreError):
    """Refused because other records still depend on it."""
