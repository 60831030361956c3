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
import json
import re
import tomllib
import zipfile
from collections.abc import Mapping
from pathlib import Path

from privacy.errors import IntegrityError

PACKAGES = ("client", "privacy", "server")  # medfed's packages: what a medfed bundle holds
CLIENTAPP = "client.app:app"
CONTENT = ".info/CONTENT"  # Flower's list of (path, sha256, size) of every file of a FAB
PYPROJECT = "pyproject.toml"
MAX_BUNDLE = 10 * 2**20  # Flower's own limit on a FAB (compressed)
MAX_UNPACKED = 64 * 2**20  # what the members may expand to, read from the zip directory before anything is read
MAX_MEMBER = 16 * 2**20
CLIENTAPP_REF = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class BundleError(IntegrityError, ValueError):
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


def safe_member(name: str) -> bool:
    """A bundle member name medfed accepts: relative, ``/``-separated segments of letters,
    digits, ``_ . -`` (no ``..``, no ``./``, no control characters, commas or backslashes)."""
    parts = name.split("/")
    return all(_SEGMENT.match(p) and p not in (".", "..") for p in parts)


def code_digest(files: Mapping[str, bytes], clientapp: str = CLIENTAPP) -> str:
    """SHA-256 over the canonical JSON of the ClientApp reference and the sorted (path, SHA-256
    of bytes) of ``files``: an unambiguous encoding, so no two bundles share a digest."""
    doc = {"clientapp": clientapp, "files": [[p, hashlib.sha256(files[p]).hexdigest()] for p in sorted(files)],
           "version": "medfed-code-v2"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


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
            infos = [i for i in z.infolist() if not i.is_dir()]
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise BundleError("app bundle holds a member twice")
            if not all(safe_member(n) for n in names if n != CONTENT):
                raise BundleError("app bundle has a member name medfed does not accept (absolute, '..', control "
                                  "characters, commas or backslashes)")
            if sum(i.file_size for i in infos) > MAX_UNPACKED or any(i.file_size > MAX_MEMBER for i in infos):
                raise BundleError(f"app bundle expands beyond {MAX_UNPACKED} bytes (or a member beyond {MAX_MEMBER})")
            members = {i.filename: z.read(i) for i in infos}
    except (zipfile.BadZipFile, ValueError, OSError, RuntimeError) as exc:
        if isinstance(exc, BundleError):
            raise
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
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
        raise BundleError("app bundle's pyproject.toml names no [tool.flwr.app.components] clientapp") from None
    if not CLIENTAPP_REF.match(clientapp):
        raise BundleError("app bundle's clientapp is not a `package.module:attribute` reference")
    return members, clientapp


def bundle_digest(fab: bytes) -> str:
    """The code digest of a FAB (comparable with :func:`installed_digest`)."""
    files, clientapp = bundle_code(fab)
    return code_digest(files, clientapp)
