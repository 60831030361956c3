"""The app bundle `medfed-server run` submits: built from medfed's own installed package files
(never from a checkout's working tree), so a site can compare it with the medfed it installed."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import tomli_w

from privacy.bundle import CLIENTAPP, PYPROJECT, code_digest, installed_code
from server.config import RESUME_KEY, RunConfig

SERVERAPP = "server.app:app"


def app_project() -> dict[str, object]:
    """The bundle's ``pyproject.toml``: medfed's name and version, its two apps, the run-config keys."""
    try:
        version = metadata.version("medfed")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    config = {k.replace("_", "-"): v for k, v in asdict(RunConfig()).items()}
    config[RESUME_KEY] = False  # medfed-server run --resume: an instruction to the ServerApp, not run config
    return {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "medfed", "version": version, "dependencies": [], "license": "Apache-2.0",
                    "description": "medfed: federated, differentially private training on hospital DICOM archives"},
        "tool": {"flwr": {"app": {"publisher": "medfed", "components": {"serverapp": SERVERAPP, "clientapp": CLIENTAPP},
                                  "config": config}}},
    }


@contextmanager
def app_dir() -> Iterator[tuple[Path, str]]:
    """A temporary Flower App directory holding exactly medfed's installed code, and its digest
    (what `flwr run` packs into the bundle every site checks)."""
    files = installed_code()
    with tempfile.TemporaryDirectory(prefix="medfed-app-") as tmp:
        root = Path(tmp) / "medfed"  # flwr takes the folder's name as the app's: letters, digits, hyphens only
        for rel, data in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (root / PYPROJECT).write_text(tomli_w.dumps(app_project()))
        yield root, code_digest(files)
