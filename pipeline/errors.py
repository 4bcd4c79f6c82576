"""Exceptions that carry a message meant for the user (printed as one ``ERROR:`` line)."""


class AirysortError(Exception):
    """A problem with the user's input or store; the message says what and how to fix it."""


class StoreLockedError(AirysortError):
    """Another airysort process is writing to the store."""
