"""The identity of the code a site runs: a content digest of medfed's Python packages, or of the
code files of a Flower App Bundle (FAB), that depends on file paths and bytes only (not on zip
timestamps, compression or member order).

The digest covers the ClientApp reference too, so approving a bundle approves what it runs.
A FAB's ``pyproject.toml`` is not code (Flower rewrites it when building) and is not covered;
every other member is, so a bundle with one extra file or one changed byte has another digest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tomllib
import zipfile
from collections.abc import Mapping
from pathlib import Path

PACKAGES = ("client", "privacy", "server")  # medfed's packages: what a medfed bundle holds
CLIENTAPP = "client.app:app"
CONTENT = ".info/CONTENT"  # Flower's list of (path, sha256, size) of every file of a FAB
PYPROJECT = "pyproject.toml"
MAX_BUNDLE = 10 * 2**20  # Flower's own limit on a FAB


class BundleError(ValueError):
    """An app bundle is malformed (not a zip, a file that does not match its listed hash, ...)."""


def installed_code() -> dict[str, bytes]:
    """``relative path -> bytes`` of every ``.py`` file of the medfed packages this interpreter
    imports (located without importing them)."""
    files: dict[str, bytes] = {}
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise BundleError(f"medfed package {pkg!r} is not installed")
        for location in spec.submodule_search_locations:
            root = Path(location)
            for path in sorted(root.rglob("*.py")):
                if "__pycache__" not in path.parts:
                    files[f"{pkg}/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    return files


def code_digest(files: Mapping[str, bytes], clientapp: str = CLIENTAPP) -> str:
    """SHA-256 over the ClientApp reference and the sorted (path, SHA-256 of bytes) of ``files``."""
    h = hashlib.sha256(b"medfed-code-v1\0clientapp=" + clientapp.encode() + b"\0")
    for path in sorted(files):
        h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return h.hexdigest()


def installed_digest() -> str:
    """The digest of the medfed this interpreter runs (what a site approves by default)."""
    return code_digest(installed_code())


def bundle_code(fab: bytes) -> tuple[dict[str, bytes], str]:
    """The code files of a FAB and its ClientApp reference, after checking every listed hash.

    Raises
    ------
    BundleError
        Not a zip, too large, a member missing from or not matching ``.info/CONTENT``, or a
        ``pyproject.toml`` without ``[tool.flwr.app.components].clientapp``.
    """
    if len(fab) > MAX_BUNDLE:
        raise BundleError(f"app bundle of {len(fab)} bytes exceeds {MAX_BUNDLE}")
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            members = {i.filename: z.read(i) for i in z.infolist() if not i.is_dir()}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise BundleError(f"app bundle is not a readable zip ({type(exc).__name__})") from None
    if CONTENT not in members or PYPROJECT not in members:
        raise BundleError(f"app bundle lacks {CONTENT} or {PYPROJECT}")
    listed: dict[str, str] = {}
    for line in members.pop(CONTENT).decode("utf-8", "replace").splitlines():
        path, _, rest = line.partition(",")
        listed[path] = rest.partition(",")[0]
    if set(listed) != set(members):
        raise BundleError("app bundle members differ from its .info/CONTENT list")
    for path, data in members.items():
        if hashlib.sha256(data).hexdigest() != listed[path]:
            raise BundleError("an app bundle member does not match its listed SHA-256")
    try:
        project = tomllib.loads(members.pop(PYPROJECT).decode())
        clientapp = str(project["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise BundleError("app bundle's pyproject.toml names no [tool.flwr.app.components] clientapp") from None
    return members, clientapp


def bundle_digest(fab: bytes) -> str:
    """The code digest of a FAB (comparable with :func:`installed_digest`)."""
    files, clientapp = bundle_code(fab)
    return code_digest(files, clientapp)
