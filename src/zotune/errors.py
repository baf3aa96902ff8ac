"""User-facing errors."""


class ZotuneError(Exception):
    """A user-facing error: one clear line, CLI exit code 2."""
