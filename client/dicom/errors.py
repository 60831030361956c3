"""Errors of the site data path: each names the file or folder, the cause and the fix."""

from __future__ import annotations


class SiteDataError(Exception):
    """A site's data folder or labels file cannot be used; the message says how to fix it."""


class DicomReadError(Exception):
    """A file cannot serve as a grayscale image; ``reason`` says why (no patient values)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
