"""Software versions and a fingerprint of the code that ran (for run-start and the report)."""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("server", "client", "privacy")
VERSIONED = ("medfed", "flwr", "opacus", "torch", "pydicom", "numpy", "cryptography")


def code_sha256() -> str:
    """SHA-256 over the source of medfed's packages (relative path + bytes, sorted)."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Python and the versions of the libraries that decide what a run computes."""
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out
