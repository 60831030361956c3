"""Software versions (for run-start and the report); the code's own digest is ``privacy.bundle``."""

from __future__ import annotations

import platform
from importlib import metadata

VERSIONED = ("medfed", "flwr", "opacus", "torch", "pydicom", "numpy", "cryptography")


def versions() -> dict[str, str]:
    """Python and the versions of the libraries that decide what a run computes."""
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out
