"""The ingest cache: preprocessed frames stored once per (file content hash, preprocessing).

Layout under ``<workspace>/cache/ingest-<preprocessing key>-v<record version>/``:

- ``shard-<id>.npy``: float32 ``(M, size, size)`` frames of one ingest batch, written
  atomically (temp, fsync, rename) and read memory-mapped;
- ``index.jsonl``: an append-only journal, one fsynced line per batch naming its shard,
  the batch's file records (by content hash) and the ``path -> (size, mtime, hash)``
  index that lets a later pass find its entries without opening the DICOM files.

A batch becomes visible only when its journal line is complete, after its shard is on
disk; a crash mid-ingest leaves a torn last line that loading ignores (and the next
append cuts off), and at most an unreferenced shard that loading deletes. A changed file
gets a new content hash (new entry); other entries stay valid. Records hold keyed hashes
of identifiers, never their values.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privacy.files import atomic_write

JOURNAL = "index.jsonl"


@dataclass(frozen=True)
class FileRecord:
    """Outcome of ingesting one file: an image (with its frames stored), skipped, or an error."""

    status: str  # "image" | "skipped" | "error"
    reason: str = ""
    frames: int = 0  # samples stored, after the multi-frame policy
    total_frames: int = 0
    sop: str = ""  # keyed hashes of SOPInstanceUID, StudyInstanceUID, PatientID
    study: str = ""
    patient: str = ""
    modality: str = ""
    syntax: str = ""
    phi: tuple[str, ...] = ()
    burned_in: bool = False
    identity_removed: bool = False
    fingerprints: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: dict) -> FileRecord:
        """Inverse of :meth:`to_json` (lists back to tuples)."""
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in obj.items() if k in _FIELDS}
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready values (``asdict`` without its deep copies: 10x faster)."""
        return {k: list(v) if isinstance(v := getattr(self, k), tuple) else v for k in _FIELD_NAMES}


_FIELD_NAMES = tuple(FileRecord.__dataclass_fields__)
_FIELDS = set(_FIELD_NAMES)


@dataclass(frozen=True)
class Processed:
    """A file as a worker returns it."""

    rel: str
    size: int
    mtime_ns: int
    digest: str
    record: FileRecord
    frames: np.ndarray | None = None


@dataclass
class IngestStore:
    """Journal + shards on disk (``root``), or in memory only when ``root`` is ``None``."""

    root: Path | None
    files: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    records: dict[str, FileRecord] = field(default_factory=dict)
    location: dict[str, tuple[str, int]] = field(default_factory=dict)
    _memory: dict[str, np.ndarray] = field(default_factory=dict)
    _maps: dict[str, np.ndarray] = field(default_factory=dict)
    _good: int = 0

    def __post_init__(self) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._good = self._replay(self.root / JOURNAL)
        shards = {shard for shard, _ in self.location.values()}
        for path in self.root.iterdir():  # shards of batches whose journal line never landed
            if path.name.startswith(("shard-", ".shard-")) and path.name not in shards:
                path.unlink(missing_ok=True)

    @classmethod
    def read_only(cls, root: Path) -> IngestStore:
        """The journal's records without touching the folder (no cleanup): for readers
        that may run while an ingest commits."""
        store = cls(None)
        store._replay(Path(root) / JOURNAL)
        return store

    def _replay(self, journal: Path) -> int:
        """Apply the journal's complete lines; returns the offset after the last good one."""
        good = 0
        if journal.is_file():
            for line in journal.read_bytes().splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # torn last line of a crashed append
                try:
                    self._apply(json.loads(line))
                except (ValueError, TypeError, KeyError):
                    break
                good += len(line)
        return good

    def _apply(self, obj: dict) -> None:
        for digest, rec in obj["records"].items():
            self.records[digest] = FileRecord.from_json(rec)
            if "row" in rec:
                self.location[digest] = (obj["shard"], int(rec["row"]))
        for rel, (size, mtime, digest) in obj["files"].items():
            self.files[rel] = (int(size), int(mtime), str(digest))

    def lookup(self, rel: str, size: int, mtime_ns: int) -> str | None:
        """Content hash of ``rel`` if it is indexed with this size and mtime and has a record."""
        hit = self.files.get(rel)
        if hit is None or hit[0] != size or hit[1] != mtime_ns or hit[2] not in self.records:
            return None
        return hit[2]

    def commit(self, batch: list[Processed]) -> None:
        """Persist one batch: shard first (atomic), then its journal line (fsynced)."""
        shard = f"shard-{uuid.uuid4().hex}.npy"
        stacks, records, rows, row = [], {}, {}, 0
        for item in batch:
            rec = item.record.to_json()
            if item.frames is not None and len(item.frames):
                rec["row"] = rows[item.digest] = row
                stacks.append(item.frames)
                row += len(item.frames)
                self._memory[item.digest] = item.frames
            records[item.digest] = rec
        files = {p.rel: (p.size, p.mtime_ns, p.digest) for p in batch}
        entry = {"shard": shard if stacks else None, "records": records, "files": files}
        if self.root is not None:
            if stacks:
                frames = np.concatenate(stacks).astype(np.float32, copy=False)
                atomic_write(self.root / shard, lambda fh: np.save(fh, frames))
            line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
            journal = self.root / JOURNAL
            with open(journal, "ab") as fh:
                if fh.tell() != self._good:
                    fh.truncate(self._good)
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            self._good += len(line)
        # what replaying the line would give, from the records in hand
        self.records.update((item.digest, item.record) for item in batch)
        self.location.update((digest, (shard, r)) for digest, r in rows.items())
        self.files.update(files)

    def gather(self, digests: list[str], shape: tuple[int, ...]) -> np.ndarray:
        """The stored frames of these image records, concatenated in order (one copy per shard)."""
        counts = [self.records[d].frames for d in digests]
        out = np.empty((sum(counts), *shape), dtype=np.float32)
        rows: dict[str, tuple[list[int], list[int]]] = {}  # shard -> (destination rows, source rows)
        at = 0
        for digest, n in zip(digests, counts, strict=True):
            if digest in self._memory:
                out[at : at + n] = self.frames(digest)
            else:
                shard, row = self.location[digest]
                dst, src = rows.setdefault(shard, ([], []))
                dst.extend(range(at, at + n))
                src.extend(range(row, row + n))
            at += n
        for shard, (dst, src) in rows.items():
            out[np.asarray(dst)] = self._map(shard)[np.asarray(src)]
        return out

    def _map(self, shard: str) -> np.ndarray:
        if shard not in self._maps:
            assert self.root is not None
            self._maps[shard] = np.load(self.root / shard, mmap_mode="r")
        return self._maps[shard]

    def frames(self, digest: str) -> np.ndarray:
        """The stored frames of an image record."""
        if digest in self._memory:
            return self._memory[digest]
        shard, row = self.location[digest]
        return self._map(shard)[row : row + self.records[digest].frames]
