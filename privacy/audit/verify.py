"""Verify audit logs: chains, signatures, sequence, and the server/site cross-check of a run.

Every problem names the file, the entry's ``seq`` and what is wrong; the first problem is
what ``medfed-audit verify`` reports.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privacy.audit.events import SERVER_ACTOR, E
from privacy.audit.log import FIELDS, GENESIS, Entry, body_hash, canonical
from privacy.audit.trust import Trust

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


SITE_ROUND_EVENTS = (E.ROUND_TRAINED, E.REFUSED, E.EVALUATED)
EPSILON_REL = 1e-3  # a reply's ε is quantised before it leaves the site; the site's log keeps it exact


def _site_epsilon(entry: Entry) -> float | None:
    value = entry.data.get("epsilon_after", entry.data.get("epsilon"))
    return float(value) if isinstance(value, int | float) else None


def _same_epsilon(a: Any, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return isinstance(a, int | float) and math.isclose(float(a), b, rel_tol=EPSILON_REL, abs_tol=1e-9)


def cross_check(server: Chain, sites: dict[str, Chain], metrics: dict[str, Any] | None,
                server_file: str, run_id: str | None = None, required: set[str] | None = None,
                unchecked: set[str] | None = None) -> list[Problem]:
    """Server and site logs of a run must tell the same story, both ways: every reply the server
    records is in the site's log with the same model hash and ε, every round a site recorded has
    the server's reply, and every server head a site counter-signed is in the server's chain.
    A site whose log was not given is a problem when it is ``required`` (``None``: every site),
    else it is added to ``unchecked``. ``metrics`` (metrics.json) must equal what the log signed."""
    problems: list[Problem] = []
    runs = {e.data.get("run_id") for e in server.entries if e.event == E.RUN_START}
    if run_id is not None:
        runs &= {run_id}
    server_seq = {e.hash: e.seq for e in server.entries}
    global_hash: dict[tuple[str, int], str] = {}
    for e in server.entries:
        if e.event == E.ROUND_START and e.data.get("run_id") in runs:
            global_hash[(e.data["run_id"], int(e.data["round"]))] = str(e.data["global_sha256"])
    claimed: dict[tuple[str, str, int], Entry] = {}
    evaluated: dict[tuple[str, str, int], Entry] = {}  # replies to evaluate: in the site's log too
    for e in server.entries:
        if e.event == E.SITE_REPLY and e.data.get("run_id") in runs:
            key = (str(e.data["site"]), str(e.data["run_id"]), int(e.data["round"]))
            (evaluated if str(e.data.get("status", "")).startswith("evaluat") else claimed)[key] = e
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
        if not _same_epsilon(e.data.get("epsilon"), _site_epsilon(mine[-1])):
            problems.append(Problem(server_file, e.seq, f"ε the server recorded for site {site} in round {rnd} "
                                                        f"({e.data.get('epsilon')}) is not the site's "
                                                        f"({_site_epsilon(mine[-1])}, site seq {mine[-1].seq})"))
        head = e.data.get("site_head")
        if head and head not in {s.hash for s in chain.entries}:
            problems.append(Problem(file, None, f"the head hash site {site} reported in round {rnd} (server seq "
                                                f"{e.seq}) is not in its log (entries deleted or log truncated)"))
    for (site, run, rnd), e in sorted(evaluated.items()):
        chain = sites.get(site)
        head = e.data.get("site_head")
        if chain is None:
            continue
        file = chain.files[-1] if chain.files else site
        if head and head not in {s.hash for s in chain.entries}:
            problems.append(Problem(file, None, f"the head hash site {site} reported with its validation "
                                                f"metrics of round {rnd} (server seq {e.seq}) is not in "
                                                "its log (entries deleted or log truncated)"))
            continue
        mine = [s for s in chain.entries if s.event == E.EVALUATED and s.data.get("run_id") == run
                and int(s.data.get("round", -1)) == rnd]
        if mine and not _same_epsilon(e.data.get("epsilon"), _site_epsilon(mine[-1])):
            problems.append(Problem(server_file, e.seq, f"ε the server recorded with site {site}'s validation "
                                                        f"metrics of round {rnd} is not the site's (site seq "
                                                        f"{mine[-1].seq})"))
    for site, chain in sorted(sites.items()):
        file = chain.files[-1] if chain.files else site
        for s in chain.entries:
            if s.event not in SITE_ROUND_EVENTS or s.data.get("run_id") not in runs:
                continue
            key = (site, str(s.data["run_id"]), int(s.data["round"]))
            if key not in (evaluated if s.event == E.EVALUATED else claimed):
                what = "validation metrics of round" if s.event == E.EVALUATED else "round"
                problems.append(Problem(file, s.seq, f"site log records {what} {key[2]} of run {key[1]} but the "
                                                     "server's log has no reply from this site for it"))
            head = s.data.get("server_head")
            if not head:
                problems.append(Problem(file, s.seq, f"round {key[2]}: the site recorded no server chain head (the "
                                                     "server did not send its audit head with the request)"))
            elif head not in server_seq:
                problems.append(Problem(file, s.seq, f"round {key[2]}: the server head this site counter-signed "
                                                     f"({head[:16]}…) is not in the server's log: server entries "
                                                     "were deleted, rewritten or re-signed"))
    for run in sorted(str(r) for r in runs):
        if not any(e.event == E.RUN_END and e.data.get("run_id") == run for e in server.entries):
            problems.append(Problem(server_file, None, f"run {run} has no run-end entry: the server's log was "
                                                       "truncated, or the run did not finish"))
    if metrics is not None:
        problems += check_metrics(server, metrics, server_file)
    return problems


def check_metrics(server: Chain, metrics: dict[str, Any], server_file: str) -> list[Problem]:
    """``metrics.json`` must be what the server's log signed: each round's row (its digest in
    ``round-end``), the run's config, the final model, every ε a site reported, and the head."""
    where = "metrics.json"
    run = metrics.get("run_id")
    mine = [e for e in server.entries if e.data.get("run_id") == run]
    if not any(e.event == E.RUN_START for e in mine):
        return [Problem(where, None, f"run_id {run!r} is not a run of the server's log")]
    problems: list[Problem] = []
    start = next(e for e in mine if e.event == E.RUN_START)
    if body_hash(metrics.get("config") or {}) != start.data.get("config_sha256"):
        problems.append(Problem(where, None, f"config differs from the one the run started with (server seq "
                                             f"{start.seq})"))
    ends = {int(e.data["round"]): e for e in mine if e.event == E.ROUND_END}
    rows = metrics.get("rounds") or []
    if [r.get("round") for r in rows if isinstance(r, dict)] != sorted(ends):
        problems.append(Problem(where, None, f"rounds {[r.get('round') for r in rows if isinstance(r, dict)]} "
                                             f"are not the rounds the server's log ended ({sorted(ends)})"))
    replied: dict[tuple[str, int], list[Any]] = {}
    for e in mine:
        if e.event == E.SITE_REPLY and e.data.get("epsilon") is not None:
            replied.setdefault((str(e.data["site"]), int(e.data["round"])), []).append(e.data["epsilon"])
    for row in rows:
        if not isinstance(row, dict) or row.get("round") not in ends:
            continue
        signed = ends[row["round"]]
        if body_hash(row) != signed.data.get("metrics_sha256"):
            problems.append(Problem(where, None, f"round {row['round']} differs from the row the server signed "
                                                 f"(server seq {signed.seq}): metrics.json was edited"))
        for site, eps in (row.get("epsilon") or {}).items():
            if eps not in replied.get((str(site), int(row["round"])), []):
                problems.append(Problem(where, None, f"round {row['round']}: ε {eps} of site {site} is not one the "
                                                     "site reported (server log)"))
    end = next((e for e in mine if e.event == E.RUN_END), None)
    if end is not None:  # a missing run-end is cross_check's problem
        if metrics.get("final_model_sha256") != end.data.get("final_sha256"):
            problems.append(Problem(where, None, f"final_model_sha256 is not the final model of the run (server seq "
                                                 f"{end.seq})"))
        if ("ended_early" in metrics) != (end.data.get("ended_early") is not None):
            problems.append(Problem(where, None, f"ended_early disagrees with the run's end (server seq {end.seq})"))
    recorded = (metrics.get("audit") or {}).get("server_head")
    if recorded is None:
        problems.append(Problem(where, None, "no audit.server_head recorded"))
    elif recorded != server.head:
        problems.append(Problem(server_file, None, "the log's last entry is not the head recorded in metrics.json "
                                                   "(entries removed from the end, or appended after the run)"))
    return problems


def counter_signed(server: Chain, sites: dict[str, Chain]) -> int:
    """The last server ``seq`` some given site log counter-signed (-1: none): entries after it
    are signed by the server alone."""
    seqs = {e.hash: e.seq for e in server.entries}
    heads = [seqs[h] for c in sites.values() for s in c.entries if (h := s.data.get("server_head")) in seqs]
    return max(heads, default=-1)


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


def verify_paths(logs: dict[str, list[Path]], trust: Trust, metrics: dict[str, Any] | None = None,
                 required: set[str] | None = None, *, server_only: bool = False) -> Verdict:
    """Verify each actor's segments (``{actor: files}``, the server's under ``server``) with the
    keys of ``trust``, and cross-check. ``required``: sites whose logs must be among ``logs``
    (``None``: every site the server names). Without any site log the server's log alone proves
    nothing about the sites: that fails unless ``server_only``, which also lets the logs of sites
    the server names be missing (listed as unchecked)."""
    chains = {actor: check_chain(files, trust.key(actor), actor) for actor, files in logs.items()}
    problems = [p for c in chains.values() for p in c.problems]
    unchecked: set[str] = set()
    server = chains.get(SERVER_ACTOR)
    sites = {a: c for a, c in chains.items() if a != SERVER_ACTOR}
    if not problems and server is not None:
        server_file = server.files[-1] if server.files else SERVER_ACTOR
        if not sites and not server_only:
            problems.append(Problem(server_file, None, "no site log was given: the server's log alone cannot show "
                                                       "what the sites did; pass the sites' workspaces or exports, "
                                                       "or --server-only to verify the server's log by itself"))
        problems += cross_check(server, sites, metrics, server_file, required=set() if server_only else required,
                                unchecked=unchecked)
    return Verdict(ok=not problems, chains=chains, problems=problems, unchecked=sorted(unchecked),
                   trust=trust.source, out_of_band=trust.out_of_band,
                   counter_signed=counter_signed(server, sites) if server is not None else -1,
                   metrics_checked=metrics is not None and server is not None)


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
