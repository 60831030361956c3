"""A signed, hash-chained audit log in JSON Lines.

Each line is the canonical JSON (sorted keys, no spaces, ASCII) of one entry::

    {"actor", "data", "event", "hash", "prev", "seq", "sig", "time"}

``hash`` is SHA-256 over the canonical JSON of ``{actor, data, event, prev, seq, time}``,
``prev`` is the previous entry's ``hash`` (64 zeros for the first), ``sig`` is the actor's
Ed25519 signature of the 32 hash bytes (hex). ``data`` holds numbers, booleans and
identifier-like strings only (run ids, site names, hex hashes, codes): no free text, so no
identifying value can be written by accident.

Appends hold an exclusive ``flock`` on the file (other processes) and a lock per instance
(threads), read the chain head from the file, write one line and ``fsync``. A writer that
dies mid-append leaves a torn last line without a newline; the next append cuts it off
and continues the chain from the last complete entry. :meth:`AuditLog.rotate` closes a
segment with a signed ``segment-close`` entry and moves it aside; the next segment's
first entry continues the chain from it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.clock import timestamp
from privacy.errors import IntegrityError

GENESIS = "0" * 64
FIELDS = ("actor", "data", "event", "hash", "prev", "seq", "sig", "time")
_SAFE = re.compile(r"^[A-Za-z0-9_.:+\-/]{0,160}$")
_TAIL = 65536


class AuditLogError(IntegrityError, ValueError):
    """An entry cannot be written (unsafe data) or the log file is unusable."""


def canonical(obj: Any) -> bytes:
    """The one byte encoding of a JSON value that hashes and lines use."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def body_hash(body: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical encoding of the entry without ``hash`` and ``sig``."""
    return hashlib.sha256(canonical(body)).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One audit log entry."""

    seq: int
    time: str
    actor: str
    event: str
    data: dict[str, Any]
    prev: str
    hash: str
    sig: str

    def body(self) -> dict[str, Any]:
        return {"actor": self.actor, "data": self.data, "event": self.event, "prev": self.prev,
                "seq": self.seq, "time": self.time}

    def line(self) -> bytes:
        return canonical({**self.body(), "hash": self.hash, "sig": self.sig}) + b"\n"

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Entry:
        return cls(**{k: obj[k] for k in FIELDS})


def check_data(value: Any, where: str = "data") -> None:
    """Refuse anything but numbers, booleans, None and identifier-like strings (recursively)."""
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise AuditLogError(f"{where}: non-finite number")
        return
    if isinstance(value, str):
        if not _SAFE.match(value):
            raise AuditLogError(f"{where}: strings in audit data must be identifiers (letters, digits, . _ - : / +), "
                                "at most 160 characters; free text is not logged")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_data(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or not _SAFE.match(k):
                raise AuditLogError(f"{where}: keys must be identifiers")
            check_data(v, f"{where}.{k}")
        return
    raise AuditLogError(f"{where}: unsupported type {type(value).__name__}")


def now_iso() -> str:
    return timestamp("microseconds")


def _last_complete(fh: Any) -> tuple[int, Entry | None]:
    """``(offset after the last complete line, that line's entry)`` of an open binary file."""
    size = fh.seek(0, os.SEEK_END)
    start = max(0, size - _TAIL)
    while True:
        fh.seek(start)
        chunk = fh.read(size - start)
        end = chunk.rfind(b"\n")
        if end < 0:
            if start == 0:
                return 0, None
            start = max(0, start - _TAIL)
            continue
        begin = chunk.rfind(b"\n", 0, end) + 1
        if begin == 0 and start > 0:
            start = max(0, start - _TAIL)
            continue
        try:
            entry = Entry.from_json(json.loads(chunk[begin:end]))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditLogError(f"last complete line of the audit log is not an entry ({type(exc).__name__}); "
                                "run `medfed-audit verify` on it") from None
        return start + end + 1, entry


class AuditLog:
    """Append-only signed log of one actor at ``path``."""

    def __init__(self, path: Path, actor: str, key: Ed25519PrivateKey) -> None:
        check_data(actor, "actor")
        self.path = Path(path)
        self.actor = actor
        self._key = key
        self._lock = threading.Lock()

    def append(self, event: str, data: dict[str, Any] | None = None) -> Entry:
        """Sign and append one entry; returns it (its ``hash`` is the new head)."""
        data = dict(data or {})
        check_data(event, "event")
        check_data(data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                good, last = _last_complete(fh)
                if fh.seek(0, os.SEEK_END) != good:
                    fh.truncate(good)  # torn line of a writer that died mid-append
                if last is None:
                    last = self._previous_segment_tail()
                entry = self._sign(last, event, data)
                fh.seek(0, os.SEEK_END)
                fh.write(entry.line())
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return entry

    def _sign(self, last: Entry | None, event: str, data: dict[str, Any]) -> Entry:
        seq = 0 if last is None else last.seq + 1
        prev = GENESIS if last is None else last.hash
        unsigned = Entry(seq=seq, time=now_iso(), actor=self.actor, event=event, data=data, prev=prev, hash="", sig="")
        digest = body_hash(unsigned.body())
        sig = self._key.sign(bytes.fromhex(digest)).hex()
        return replace(unsigned, hash=digest, sig=sig)

    def segments(self) -> list[Path]:
        """Closed segments of this log, oldest first."""
        return sorted(self.path.parent.glob(f"{self.path.stem}.*-*{self.path.suffix}"))

    def _previous_segment_tail(self) -> Entry | None:
        closed = self.segments()
        if not closed:
            return None
        with open(closed[-1], "rb") as fh:
            return _last_complete(fh)[1]

    def head(self) -> str:
        """Hash of the last complete entry (``GENESIS`` for an empty log)."""
        if not self.path.exists():
            return GENESIS
        with open(self.path, "rb") as fh:
            _, last = _last_complete(fh)
        last = last or self._previous_segment_tail()
        return GENESIS if last is None else last.hash

    def rotate(self) -> Path:
        """Close this segment with a signed checkpoint and move it to ``<stem>.<first>-<last>.jsonl``."""
        close = self.append("segment-close", {"file": self.path.name})
        first = read_entries(self.path)[0].seq
        target = self.path.with_name(f"{self.path.stem}.{first:08d}-{close.seq:08d}{self.path.suffix}")
        os.replace(self.path, target)
        self.append("segment-open", {"previous_segment": target.name})
        return target


def read_entries(path: Path) -> list[Entry]:
    """Entries of the complete lines of ``path`` (no verification: see ``privacy.audit.verify``);
    a line that is not an entry raises :class:`AuditLogError` naming it."""
    out = []
    for number, line in enumerate(Path(path).read_bytes().splitlines(keepends=True), 1):
        if line.endswith(b"\n"):
            try:
                obj = json.loads(line)
                out.append(Entry.from_json(obj))
            except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise AuditLogError(f"{path}: line {number} is not an audit entry ({type(exc).__name__}); the log is "
                                    "damaged: run medfed-audit verify, and restore the file from a copy") from None
    return out
