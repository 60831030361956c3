"""The site's identifier key and the set of keyed fingerprints of its identifying header
values, both under the site's ``keys/`` folder (0600 files in a 0700 folder).

The key hashes identifiers (UIDs the labels are matched by, PatientIDs) and fingerprints
identifying values; the fingerprint set is what the egress guard never lets out. The
ingest writes the set after every pass over the export; the guard rebuilds it from the
DICOM scan when it is missing and refuses to send anything while it cannot. Deleting the
ingest cache changes neither: they are not in ``cache/``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from privacy.errors import IntegrityError
from privacy.files import atomic_write_bytes, atomic_write_json, exclusive_lock, private_dir

KEY_FILE = "identifier.key"
PRINTS_FILE = "identifying-fingerprints.json"
KEY_BYTES = 32
PRINTS_VERSION = 1


class IdentifierKeyError(IntegrityError, ValueError):
    """The identifier key file is unusable; the message names the file and the fix."""


def key_id(key: bytes) -> str:
    """A public name of the key (HMAC of a constant): which key a fingerprint set or an ingest
    store was made with, without revealing it."""
    return hmac.new(key, b"medfed identifier key id", hashlib.sha256).hexdigest()[:16]


def identifier_key(folder: Path) -> bytes:
    """The key in ``folder`` (``keys/`` of a site), created 0600 on first use. Concurrent
    first uses (an ingest and the guard) agree on one key: creation holds a lock."""
    folder = Path(folder)
    path = folder / KEY_FILE
    if not path.is_file():
        private_dir(folder)
        with exclusive_lock(folder / f".{KEY_FILE}.lock"):
            if not path.is_file():
                atomic_write_bytes(path, secrets.token_bytes(KEY_BYTES), mode=0o600)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise IdentifierKeyError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte identifier key: delete it "
                                 "and run `medfed-site check` to rebuild the key and the fingerprints from the export")
    return key


@dataclass(frozen=True)
class Fingerprints:
    """The keyed fingerprints of every identifying value the site's exports hold, and their key."""

    prints: frozenset[str]
    key: bytes


def save_fingerprints(folder: Path, key: bytes, prints: Iterable[str]) -> None:
    """Add ``prints`` (made with ``key``) to the set in ``folder``; a set made with another key
    is replaced (its fingerprints cannot be compared any more)."""
    folder = Path(folder)
    private_dir(folder)
    with exclusive_lock(folder / f".{PRINTS_FILE}.lock"):
        known = load_fingerprints(folder)
        merged = set(prints) | (set(known.prints) if known is not None and known.key == key else set())
        atomic_write_json(folder / PRINTS_FILE, {"version": PRINTS_VERSION, "key_id": key_id(key),
                                                 "fingerprints": sorted(merged)})


def load_fingerprints(folder: Path) -> Fingerprints | None:
    """The set in ``folder``; ``None`` when the key or the set is missing, unreadable, or made
    with another key than the one in ``folder`` (the caller rebuilds it from the export).

    The guard asks before every reply: the parsed set is kept while neither file changes
    (same inode, size and modification time; every write is an atomic replace, a new inode)."""
    folder = Path(folder)
    key_path, path = folder / KEY_FILE, folder / PRINTS_FILE
    try:
        stamp = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (key_path.stat(), path.stat()))
    except OSError:
        return None
    cached = _LOADED.get(folder)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    found = _read_fingerprints(key_path, path)
    if found is not None:
        _LOADED[folder] = (stamp, found)
    return found


_LOADED: dict[Path, tuple[tuple[tuple[int, int, int], ...], Fingerprints]] = {}


def _read_fingerprints(key_path: Path, path: Path) -> Fingerprints | None:
    try:
        key = key_path.read_bytes()
        doc = json.loads(path.read_text())
        ok = (isinstance(doc, dict) and doc.get("version") == PRINTS_VERSION and doc.get("key_id") == key_id(key)
              and isinstance(doc.get("fingerprints"), list))
    except (OSError, ValueError):
        return None
    if not ok:
        return None
    return Fingerprints(frozenset(str(p) for p in doc["fingerprints"]), key)
