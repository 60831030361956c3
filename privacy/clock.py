"""The one clock medfed writes down: UTC timestamps in ISO 8601."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def timestamp(timespec: str = "seconds") -> str:
    """UTC now in ISO 8601 with ``Z`` (``timespec`` as :meth:`datetime.isoformat`: seconds for
    ledgers and records, microseconds for audit entries)."""
    return utc_now().isoformat(timespec=timespec).replace("+00:00", "Z")
