"""Verify audit logs: chains, signatures, sequence, and the server/site cross-check of a run.

Every problem names the file, the entry's ``seq`` and what is wrong; the first problem is
what ``medfed-audit verify`` reports.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy.audit.events import SERVER_ACTOR, E
from privacy.audit.keys import KeyFileError, load_public_key
from privacy.audit.log import FIELDS, GENESIS, Entry, body_hash, canonical

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Problem:
    """What is wrong, where."""

    file: str
    seq: int | None
    what: str

    def __str__(self) -> str:
        return f"{self.file}" + (f", seq {self.seq}" if self.seq is not None else "") + f": {self.what}"


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


def cross_check(server: Chain, sites: dict[str, Chain], metrics: dict[str, Any] | None,
                server_file: str, run_id: str | None = None, required: set[str] | None = None,
                unchecked: set[str] | None = None) -> list[Problem]:
    """Server and site logs of a run must tell the same story, both ways. A site whose log
    was not given is a problem when it is ``required`` (``None``: every site), else it is
    added to ``unchecked``."""
    problems: list[Problem] = []
    runs = {e.data.get("run_id") for e in server.entries if e.event == E.RUN_START}
    if run_id is not None:
        runs &= {run_id}
    global_hash: dict[tuple[str, int], str] = {}
    for e in server.entries:
        if e.event == E.ROUND_START and e.data.get("run_id") in runs:
            global_hash[(e.data["run_id"], int(e.data["round"]))] = str(e.data["global_sha256"])
    claimed: dict[tuple[str, str, int], Entry] = {}
    evaluated: list[Entry] = []  # replies to evaluate: their heads must be in the site's log too
    for e in server.entries:
        if e.event == E.SITE_REPLY and e.data.get("run_id") in runs:
            if str(e.data.get("status", "")).startswith("evaluat"):
                evaluated.append(e)
            else:
                claimed[(str(e.data["site"]), str(e.data["run_id"]), int(e.data["round"]))] = e
    for (site, run, rnd), e in sorted(claimed.items()):
        if e.data.get("status") not in ("trained", "refused"):
            continue
        chain = sites.get(site)
        if chain is None:
            if required is None or site in required:
                problems.append(Problem(server_file, e.seq, f"site {site} took part in round {rnd} but its log was "
                                                            "not given"))
            elif unchecked is not None:
                unchecked.add(site)
            continue
        file = chain.files[-1] if chain.files else site
        mine = [s for s in chain.entries if s.event in (E.ROUND_TRAINED, E.REFUSED)
                and s.data.get("run_id") == run and int(s.data.get("round", -1)) == rnd]
        if not mine:
            problems.append(Problem(file, None, f"the server says site {site} {e.data['status']} round {rnd} of run "
                                                f"{run} (server seq {e.seq}) but the site's log has no such entry"))
            continue
        if str(mine[-1].data.get("global_sha256")) != global_hash.get((run, rnd)):
            problems.append(Problem(file, mine[-1].seq, f"global model hash of round {rnd} differs from the server's"))
        head = e.data.get("site_head")
        if head and head not in {s.hash for s in chain.entries}:
            problems.append(Problem(file, None, f"the head hash site {site} reported in round {rnd} (server seq "
                                                f"{e.seq}) is not in its log (entries deleted or log truncated)"))
    for e in evaluated:
        chain = sites.get(str(e.data["site"]))
        head = e.data.get("site_head")
        if chain is not None and head and head not in {s.hash for s in chain.entries}:
            file = chain.files[-1] if chain.files else str(e.data["site"])
            problems.append(Problem(file, None, f"the head hash site {e.data['site']} reported with its validation "
                                                f"metrics of round {e.data['round']} (server seq {e.seq}) is not in "
                                                "its log (entries deleted or log truncated)"))
    for site, chain in sorted(sites.items()):
        file = chain.files[-1] if chain.files else site
        for s in chain.entries:
            if s.event not in (E.ROUND_TRAINED, E.REFUSED) or s.data.get("run_id") not in runs:
                continue
            key = (site, str(s.data["run_id"]), int(s.data["round"]))
            if key not in claimed:
                problems.append(Problem(file, s.seq, f"site log records round {key[2]} of run {key[1]} but the server's "
                                                     "log has no reply from this site for it"))
    if metrics is not None:
        recorded = (metrics.get("audit") or {}).get("server_head")
        if recorded is None:
            problems.append(Problem("metrics.json", None, "no audit.server_head recorded"))
        elif recorded != server.head:
            problems.append(Problem(server_file, None, "the log's last entry is not the head recorded in metrics.json "
                                                       "(entries removed from the end, or appended after the run)"))
    return problems


@dataclass
class Verdict:
    """Result of verifying a run directory (or a set of logs)."""

    ok: bool
    chains: dict[str, Chain]
    problems: list[Problem]
    unchecked: list[str] = field(default_factory=list)  # sites the server names whose logs were not given

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": [asdict(p) for p in self.problems], "unchecked_sites": self.unchecked,
            "logs": {a: {"files": c.files, "entries": len(c.entries), "head": c.head, "torn_tail": c.torn_tail}
                     for a, c in self.chains.items()},
        }


def find_key(keys_dir: Path, actor: str) -> Ed25519PublicKey | None:
    path = keys_dir / f"{actor}.pub"
    if not path.is_file():
        return None
    try:
        return load_public_key(path)
    except KeyFileError:
        return None


def verify_paths(logs: dict[str, list[Path]], keys_dir: Path, metrics: dict[str, Any] | None = None,
                 required: set[str] | None = None) -> Verdict:
    """Verify each actor's segments (``{actor: files}``, the server's under ``server``) and cross-check.

    ``required``: sites whose logs must be among ``logs`` (``None``: every site the server names)."""
    chains = {actor: check_chain(files, find_key(keys_dir, actor), actor) for actor, files in logs.items()}
    problems = [p for c in chains.values() for p in c.problems]
    unchecked: set[str] = set()
    if not problems and SERVER_ACTOR in chains:
        server = chains[SERVER_ACTOR]
        sites = {a: c for a, c in chains.items() if a != SERVER_ACTOR}
        problems += cross_check(server, sites, metrics, server.files[-1] if server.files else SERVER_ACTOR,
                                required=required, unchecked=unchecked)
    return Verdict(ok=not problems, chains=chains, problems=problems, unchecked=sorted(unchecked))


def required_sites(run_dir: Path) -> set[str]:
    """Sites whose logs a run directory must hold: every workspace under ``sites/`` (a simulation)."""
    sites_dir = run_dir / "sites"
    return {p.name for p in sites_dir.iterdir() if p.is_dir()} if sites_dir.is_dir() else set()


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
