"""The operator's commands of ``payhook`` (settlement, dlq, spool, send-test): one module each.

Each command returns its exit code and raises :class:`CommandFailed` for what the operator must
fix (a store or broker that does not answer, a spool in use): ``service.cli`` prints that as one
line on stderr, never a traceback.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


class CommandFailed(Exception):
    """One line for the operator, and the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def redacted(url: str) -> str:
    """A URL as it may be printed: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
