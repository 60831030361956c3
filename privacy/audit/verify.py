"""Verify audit logs: chains, signatures, sequence, and the server/site cross-check of a run.

Every problem names the file, the entry's ``seq`` and what is wrong; the first problem is
what ``medfed-audit verify`` reports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy.audit.crosscheck import Logs, Problem, counter_signed, cross_check
from privacy.audit.events import SERVER_ACTOR
from privacy.audit.log import FIELDS, GENESIS, Entry, body_hash, canonical
from privacy.audit.trust import Trust

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Chain:
    """One actor's log (all its segments, oldest first) after checking."""

    actor: str
    files: list[str]
    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    torn_tail: bool = False

    @property
    def head(self) -> str:
        return self.entries[-1].hash if self.entries else GENESIS

    @property
    def logs(self) -> Logs:
        return Logs(self.files[-1] if self.files else self.actor, self.entries)


def segment_files(log: Path) -> list[Path]:
    """A log's closed segments (oldest first) followed by the live file."""
    closed = sorted(log.parent.glob(f"{log.stem}.*-*{log.suffix}"))
    return [*closed, log] if log.exists() else closed


def check_chain(files: list[Path], key: Ed25519PublicKey | None, actor: str | None = None) -> Chain:
    """Check every line of ``files`` (one actor's segments, in order) against ``key``."""
    chain = Chain(actor=actor or "", files=[str(f) for f in files])
    prev, expect_seq = GENESIS, 0
    for n, path in enumerate(files):
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: b"" for a well-formed file
        if tail:
            if n == len(files) - 1:
                chain.torn_tail = True  # a writer died mid-append; the next append removes it
            else:
                chain.problems.append(Problem(str(path), None, "closed segment ends without a newline"))
                return chain
        for line in lines:
            problem = _check_line(line, prev, expect_seq, chain, key)
            if problem is not None:
                chain.problems.append(Problem(str(path), problem[0], problem[1]))
                return chain
            prev, expect_seq = chain.entries[-1].hash, chain.entries[-1].seq + 1
    return chain


def _check_line(line: bytes, prev: str, seq: int, chain: Chain, key: Ed25519PublicKey | None) -> tuple[int, str] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return seq, "line is not valid JSON (modified or truncated entry)"
    if not isinstance(obj, dict) or sorted(obj) != sorted(FIELDS):
        return seq, f"entry must have exactly the fields {list(FIELDS)}"
    if canonical(obj) != line:
        return _seq(obj, seq), "entry is not in canonical encoding (bytes were modified)"
    entry = Entry.from_json(obj)
    if not isinstance(entry.seq, int) or entry.seq != seq:
        return _seq(obj, seq), f"sequence number {entry.seq!r}, expected {seq} (entry deleted, duplicated or reordered)"
    if entry.prev != prev:
        return seq, "prev does not match the previous entry's hash (entry deleted, inserted or reordered)"
    if chain.actor and entry.actor != chain.actor:
        return seq, f"actor {entry.actor!r} in the log of {chain.actor!r}"
    chain.actor = chain.actor or entry.actor
    if not _HEX64.match(str(entry.hash)) or body_hash(entry.body()) != entry.hash:
        return seq, "hash does not match the entry's content (entry modified)"
    if key is None:
        return seq, f"no public key for actor {entry.actor!r}: pass --keys DIR holding {entry.actor}.pub"
    try:
        key.verify(bytes.fromhex(entry.sig), bytes.fromhex(entry.hash))
    except (InvalidSignature, ValueError):
        return seq, f"signature does not verify with {entry.actor}'s key (re-signed or forged entry)"
    chain.entries.append(entry)
    return None


def _seq(obj: dict[str, Any], fallback: int) -> int:
    value = obj.get("seq")
    return value if isinstance(value, int) else fallback


@dataclass
class Verdict:
    """Result of verifying a run directory (or a set of logs)."""

    ok: bool
    chains: dict[str, Chain]
    problems: list[Problem]
    unchecked: list[str] = field(default_factory=list)  # sites the server names whose logs were not given
    trust: str = ""  # where the public keys came from
    out_of_band: bool = True
    counter_signed: int = -1  # the last server seq a given site log counter-signed
    metrics_checked: bool = False

    @property
    def checked(self) -> list[str]:
        """The logs that were verified (actors)."""
        return sorted(self.chains)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": [asdict(p) for p in self.problems], "unchecked_sites": self.unchecked,
            "keys": {"source": self.trust, "out_of_band": self.out_of_band},
            "counter_signed_through": self.counter_signed, "metrics_checked": self.metrics_checked,
            "logs": {a: {"files": c.files, "entries": len(c.entries), "head": c.head, "torn_tail": c.torn_tail}
                     for a, c in self.chains.items()},
        }


def verify_paths(logs: dict[str, list[Path]], trust: Trust, metrics: dict[str, Any] | None = None, *,
                 server_only: bool = False, allow_missing: Iterable[str] = ()) -> Verdict:
    """Verify each actor's segments (``{actor: files}``, the server's under ``server``) with the
    keys of ``trust``, and cross-check (:mod:`privacy.audit.crosscheck`). The log of every site
    the server names must be given, unless it is in ``allow_missing`` or ``server_only``; without
    any site log the server's log alone proves nothing about the sites, which fails unless
    ``server_only``."""
    chains = {actor: check_chain(files, trust.key(actor), actor) for actor, files in logs.items()}
    problems = [p for c in chains.values() for p in c.problems]
    unchecked: set[str] = set()
    server = chains.get(SERVER_ACTOR)
    sites = {a: c.logs for a, c in chains.items() if a != SERVER_ACTOR}
    if not problems and server is not None:
        if not sites and not server_only:
            problems.append(Problem(server.logs.file, None, "no site log was given: the server's log alone cannot show "
                                                            "what the sites did; pass the sites' workspaces or "
                                                            "exports, or --server-only to verify the server's log by "
                                                            "itself"))
        problems += cross_check(server.logs, sites, metrics, server_only=server_only, allow_missing=allow_missing,
                                unchecked=unchecked)
    return Verdict(ok=not problems, chains=chains, problems=problems, unchecked=sorted(unchecked),
                   trust=trust.source, out_of_band=trust.out_of_band,
                   counter_signed=counter_signed(server.logs, sites) if server is not None else -1,
                   metrics_checked=metrics is not None and server is not None)


def run_logs(run_dir: Path) -> dict[str, list[Path]]:
    """The server's and every site's log of a run directory."""
    logs: dict[str, list[Path]] = {}
    server = segment_files(run_dir / "audit.jsonl")
    if server:
        logs[SERVER_ACTOR] = server
    sites_dir = run_dir / "sites"
    if sites_dir.is_dir():
        for ws in sorted(p for p in sites_dir.iterdir() if p.is_dir()):
            files = segment_files(ws / "audit.jsonl")
            if files:
                logs[ws.name] = files  # a simulation names each site workspace after its site
    return logs
