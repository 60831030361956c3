"""Errors of the site data path: each names the file or folder, the cause and the fix.

Every failure to use one file is a :class:`DicomReadError`. Its subclasses say how the
preflight counts it: :class:`NotAnImageError` is *skipped* (a valid DICOM object that
is simply not an image: SR, RT plan, DICOMDIR, waveform...), the others are *errors*.
Reasons never contain a header value of the file.
"""

from __future__ import annotations

from privacy.errors import InputError


class SiteDataError(InputError):
    """A site's data folder or labels file cannot be used; the message says how to fix it."""


class DicomReadError(InputError):
    """A file cannot serve as a grayscale image; ``reason`` says why (no patient values)."""

    skipped = False

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NotAnImageError(DicomReadError):
    """A readable object without pixels (SR, RT plan, DICOMDIR, waveform, not DICOM): skipped."""

    skipped = True


class CorruptFileError(DicomReadError):
    """The file is truncated or malformed, or its pixel data does not match its header."""


class UnsupportedImageError(DicomReadError):
    """The image is valid but cannot be used (e.g. no decoder for its transfer syntax)."""
