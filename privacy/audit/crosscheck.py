"""The server's and the sites' logs of a run must tell the same story, both ways, and
``metrics.json`` must be what the server's log signed.

The server's own log is evidence only where a site's signed log backs it: a site counter-signs
the server's chain head it received with every round, so each round of the run must carry a
counter-signature of some given site, every reply the server records from a site must be in
that site's log (and every round the site logged in the server's), and the model hashes, ε and
participants in ``metrics.json`` must follow from entries the sites confirm.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy import egress as K
from privacy.audit.events import E
from privacy.audit.log import Entry, body_hash
from privacy.errors import InputError
from privacy.quantise import OffGrid, quantise

SITE_ROUND_EVENTS = (E.ROUND_TRAINED, E.REFUSED, E.EVALUATED)
TRAIN_STATUSES = frozenset({"trained", "refused", "error", "failed"})
EVAL_STATUSES = frozenset({"evaluated", "evaluation-refused"})
STATUS_OF_EVENT = {E.ROUND_TRAINED: {"trained"}, E.REFUSED: {"refused"}, E.EVALUATED: EVAL_STATUSES}


@dataclass(frozen=True)
class Problem:
    """What is wrong, where."""

    file: str
    seq: int | None
    what: str

    def __str__(self) -> str:
        return f"{self.file}" + (f", seq {self.seq}" if self.seq is not None else "") + f": {self.what}"


@dataclass
class Logs:
    """One actor's checked log: its entries and the file problems are reported in."""

    file: str
    entries: list[Entry]


@dataclass
class RunView:
    """What the server's log says of one run."""

    run_id: str
    start: Entry
    end: Entry | None = None
    rounds: dict[int, Entry] = field(default_factory=dict)  # round-start
    aggregates: dict[int, Entry] = field(default_factory=dict)
    checkpoints: dict[int, Entry] = field(default_factory=dict)
    ends: dict[int, Entry] = field(default_factory=dict)  # round-end
    replies: dict[tuple[str, int, str], Entry] = field(default_factory=dict)  # (site, round, train|eval)
    model_after: dict[int, str] = field(default_factory=dict)  # global model after each round
    stopped: Entry | None = None  # run-stopped, when the run is stopped (not resumed since)
    resumes: list[Entry] = field(default_factory=list)  # run-resumed entries
    abandoned: set[int] = field(default_factory=set)  # rounds cut short by a stop or a crash (never applied)


def _phase(status: str) -> str | None:
    return "train" if status in TRAIN_STATUSES else "eval" if status in EVAL_STATUSES else None


def _round(entry: Entry) -> int:
    value = entry.data.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


class MetricsFileError(InputError, ValueError):
    """``metrics.json`` is not a JSON object medfed wrote (damaged, edited, duplicate keys)."""


def load_metrics(path: Path) -> dict[str, Any]:
    """``metrics.json``, refusing duplicate keys (a reader that keeps the first would see other values
    than the digest the server signed)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(keys) != len(set(keys)):
            raise MetricsFileError(f"{path}: duplicate key {next(k for k in keys if keys.count(k) > 1)!r}: the file "
                                   "was edited (medfed never writes one)")
        return dict(items)

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=pairs)
    except MetricsFileError:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise MetricsFileError(f"{path}: not JSON ({type(exc).__name__}); the file is damaged: restore it from the "
                               "run's copy (its rows are signed in the server's log)") from None
    if not isinstance(doc, dict):
        raise MetricsFileError(f"{path}: not a JSON object")
    return doc


def view_runs(server: Logs, problems: list[Problem]) -> dict[str, RunView]:
    """Index the server's log by run; malformed or duplicated entries are problems."""
    runs: dict[str, RunView] = {}
    for e in server.entries:
        run = e.data.get("run_id")
        if e.event == E.RUN_START:
            if str(run) in runs:
                problems.append(Problem(server.file, e.seq, f"run {run} starts a second time"))
            runs[str(run)] = RunView(str(run), e)
            continue
        view = runs.get(str(run))
        if view is None:
            continue
        rnd = _round(e)
        slot = {E.ROUND_START: view.rounds, E.AGGREGATE: view.aggregates, E.CHECKPOINT: view.checkpoints,
                E.ROUND_END: view.ends}.get(e.event)
        if slot is not None:
            if rnd in slot:
                problems.append(Problem(server.file, e.seq, f"a second {e.event} for round {rnd} of run {run}"))
            slot[rnd] = e
        elif e.event == E.RUN_END:
            view.end = e
        elif e.event == E.RUN_STOPPED:
            view.stopped = e
            if isinstance(e.data.get("abandoned"), int):
                view.abandoned.add(int(e.data["abandoned"]))
        elif e.event == E.RUN_RESUMED:
            view.stopped = None
            view.resumes.append(e)
            if isinstance(e.data.get("abandoned"), int):
                view.abandoned.add(int(e.data["abandoned"]))
            nxt = e.data.get("next_round")
            if not isinstance(nxt, int) or any(r >= nxt for r in view.rounds):
                problems.append(Problem(server.file, e.seq, f"run {run} resumes at round {nxt}, which is not after "
                                                            "every round it started (a round number reused)"))
        elif e.event == E.SITE_REPLY:
            status = str(e.data.get("status"))
            phase = _phase(status)
            if phase is None:
                problems.append(Problem(server.file, e.seq, f"reply status {status!r} is not one medfed writes"))
                continue
            if status in ("error", "failed") and e.data.get("epsilon") is not None:
                problems.append(Problem(server.file, e.seq, f"a {status} reply carries an ε (no site released one)"))
            key = (str(e.data.get("site")), rnd, phase)
            if key in view.replies:
                problems.append(Problem(server.file, e.seq, f"a second {phase} reply from site {key[0]} in round "
                                                            f"{rnd} (first at seq {view.replies[key].seq})"))
            view.replies[key] = e
    for view in runs.values():
        for rnd in sorted(view.abandoned & (set(view.aggregates) | set(view.ends))):
            problems.append(Problem(server.file, None, f"round {rnd} of run {view.run_id} is declared abandoned but "
                                                       "the log applied or ended it (an abandoned round hides no "
                                                       "update)"))
        model = str(view.start.data.get("initial_sha256"))
        for rnd in sorted(view.rounds):
            start = view.rounds[rnd]
            if start.data.get("global_sha256") != model:
                problems.append(Problem(server.file, start.seq, f"round {rnd} starts from another model than the "
                                                                "previous round ended with"))
            agg = view.aggregates.get(rnd)
            if agg is not None:
                model = str(agg.data.get("new_sha256"))
                ckpt = view.checkpoints.get(rnd)
                if ckpt is not None and ckpt.data.get("sha256") != model:
                    problems.append(Problem(server.file, ckpt.seq, f"checkpoint of round {rnd} is not the aggregate"))
            view.model_after[rnd] = model
        if view.end is not None and view.end.data.get("final_sha256") != model:
            problems.append(Problem(server.file, view.end.seq, "the final model is not the last round's aggregate"))
        if view.stopped is not None and view.stopped.data.get("final_sha256") != model:
            problems.append(Problem(server.file, view.stopped.seq, "the model a stopped run kept is not the last "
                                                                   "round's aggregate"))
        for resumed in view.resumes:
            before = [r for r in view.model_after if r < int(resumed.data.get("next_round") or 0)]
            expected = view.model_after[max(before)] if before else str(view.start.data.get("initial_sha256"))
            if resumed.data.get("global_sha256") != expected:
                problems.append(Problem(server.file, resumed.seq, "the run resumed from another model than its last "
                                                                  "applied round's"))
    return runs


def _site_epsilon(entry: Entry) -> float | None:
    value = entry.data.get("epsilon_after", entry.data.get("epsilon"))
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _same_epsilon(released: Any, logged: float | None) -> bool:
    """The ε the server recorded is the site's logged ε as the egress guard quantised it (exactly)."""
    if released is None or logged is None:
        return released is None and logged is None
    try:
        return isinstance(released, int | float) and float(released) == float(quantise(K.EPSILON, logged))
    except OffGrid:
        return False


def cross_check(server: Logs, sites: dict[str, Logs], metrics: dict[str, Any] | None, *,
                server_only: bool = False, allow_missing: Iterable[str] = (),
                unchecked: set[str] | None = None) -> list[Problem]:
    """Every problem between the server's log, the given site logs and ``metrics``. A site the
    server names whose log was not given is a problem unless ``server_only`` or it is in
    ``allow_missing`` (then it is added to ``unchecked``)."""
    problems: list[Problem] = []
    runs = view_runs(server, problems)
    if metrics is not None:
        wanted = str(metrics.get("run_id"))
        if wanted not in runs:
            return [*problems, Problem("metrics.json", None, f"run_id {wanted!r} is not a run of the server's log")]
        runs = {wanted: runs[wanted]}
    seq_of = {e.hash: e.seq for e in server.entries}
    missing_ok = set(allow_missing)
    for view in runs.values():
        if view.end is None and view.stopped is None:
            problems.append(Problem(server.file, None, f"run {view.run_id} has no run-end entry: the server's log "
                                                       "was truncated, or the run did not finish"))
        countersigned: set[int] = set()
        named = {site for (site, _, _), e in view.replies.items() if e.data.get("status") != "failed"}
        for site in sorted(named):
            if site not in sites:
                if server_only or site in missing_ok:
                    if unchecked is not None:
                        unchecked.add(site)
                else:
                    first = min(e.seq for (s, _, _), e in view.replies.items() if s == site)
                    problems.append(Problem(server.file, first, f"site {site} took part in run {view.run_id} but its "
                                                                "log was not given (pass its workspace or export, or "
                                                                f"--allow-missing {site})"))
        anonymous: set[int] = set()  # node-ID failures already matched to a site's lost reply
        for site, log in sorted(sites.items()):
            problems += _site_against_server(view, site, log, server.file, seq_of, countersigned,
                                             joined_required=site in named, used=anonymous)
        if sites and not server_only:
            for rnd, start in sorted(view.rounds.items()):
                if rnd not in countersigned and rnd not in view.abandoned:
                    problems.append(Problem(server.file, start.seq, f"round {rnd} of run {view.run_id} is not counter-"
                                                                    "signed by any given site log (the site logs "
                                                                    "were cut short, or the round is the server's "
                                                                    "word alone)"))
        if metrics is not None:
            problems += check_metrics(view, metrics, server)
    return problems


def _anonymous_failure(view: RunView, rnd: int, used: set[int]) -> bool:
    """Take one of round ``rnd``'s failed replies from a node the server could not name (``node-ID``),
    each excusing one site's missing reply; False when none is left."""
    for (site, r, phase), e in sorted(view.replies.items(), key=lambda kv: kv[1].seq):
        if r == rnd and phase == "train" and site.startswith("node-") and e.data.get("status") == "failed" \
                and e.seq not in used:
            used.add(e.seq)
            return True
    return False


def _site_against_server(view: RunView, site: str, log: Logs, server_file: str, seq_of: dict[str, int],
                         countersigned: set[int], *, joined_required: bool,
                         used: set[int] | None = None) -> list[Problem]:
    problems: list[Problem] = []
    run = view.run_id
    mine = [s for s in log.entries if s.data.get("run_id") == run]
    if joined_required and not any(s.event == E.RUN_JOINED for s in mine):
        problems.append(Problem(log.file, None, f"the server names site {site} in run {run} but the site's log has "
                                                "no run-joined for it (the site never took part)"))
    hashes = {s.hash for s in log.entries}
    latest: dict[tuple[int, str], Entry] = {}
    used_anonymous = used if used is not None else set()
    for s in mine:
        if s.event not in SITE_ROUND_EVENTS:
            continue
        rnd = _round(s)
        phase = "eval" if s.event == E.EVALUATED else "train"
        latest[(rnd, phase)] = s
        reply = view.replies.get((site, rnd, phase))
        what = "validation metrics of round" if phase == "eval" else "round"
        # a site may have answered a round the server cut short (stop or crash) before the server logged the
        # reply, or trained and died (or lost its reply) before it arrived: the site's ledger counts it, and
        # the server records the reply as failed, by name or, for a node it never heard from, as node-ID
        cut_short = reply is None and rnd in view.abandoned
        lost = phase == "train" and s.event == E.ROUND_TRAINED and (
            (reply is not None and reply.data.get("status") == "failed")
            or (reply is None and _anonymous_failure(view, rnd, used_anonymous)))
        start = view.rounds.get(rnd)
        if phase == "train" and start is not None and s.data.get("global_sha256") != start.data.get("global_sha256"):
            # whatever the server says became of the reply (trained, lost, abandoned): the site trained on the
            # round's one global model, or the server sent it another (model inconsistency)
            problems.append(Problem(log.file, s.seq, f"global model hash of round {rnd} differs from the server's"))
        if not (cut_short or lost) and (reply is None or reply.data.get("status") not in STATUS_OF_EVENT[s.event]):
            problems.append(Problem(log.file, s.seq, f"site log records {what} {rnd} of run {run} ({s.event}) but the "
                                                     "server's log has no such reply from this site"))
        head = s.data.get("server_head")
        if not head:
            problems.append(Problem(log.file, s.seq, f"round {rnd}: the site recorded no server chain head (the server "
                                                     "did not send its audit head with the request)"))
        elif head not in seq_of:
            problems.append(Problem(log.file, s.seq, f"round {rnd}: the server head this site counter-signed "
                                                     f"({head[:16]}…) is not in the server's log: server entries were "
                                                     "deleted, rewritten or re-signed"))
        elif reply is not None and seq_of[head] >= reply.seq:
            problems.append(Problem(log.file, s.seq, f"round {rnd}: the server head this site counter-signed comes "
                                                     f"after the server's record of its reply (seq {reply.seq})"))
        elif rnd in view.rounds and seq_of[head] >= view.rounds[rnd].seq:
            countersigned.add(rnd)
        if phase == "eval" and rnd in view.model_after and s.data.get("global_sha256") != view.model_after[rnd]:
            problems.append(Problem(log.file, s.seq, f"the model this site evaluated in round {rnd} is not the "
                                                     "server's model after that round"))
    for (s_site, rnd, phase), e in sorted(view.replies.items(), key=lambda kv: kv[1].seq):
        if s_site != site or e.data.get("status") in ("error", "failed"):
            continue
        entry = latest.get((rnd, phase))
        if entry is None:
            problems.append(Problem(log.file, None, f"the server says site {site} {e.data.get('status')} round {rnd} "
                                                    f"of run {run} (server seq {e.seq}) but the site's log has no "
                                                    "such entry"))
            continue
        if not _same_epsilon(e.data.get("epsilon"), _site_epsilon(entry)):
            problems.append(Problem(server_file, e.seq, f"ε the server recorded for site {site} in round {rnd} "
                                                        f"({e.data.get('epsilon')}) is not the site's "
                                                        f"({_site_epsilon(entry)}, site seq {entry.seq})"))
        head = e.data.get("site_head")
        if head and head not in hashes:
            problems.append(Problem(log.file, None, f"the head hash site {site} reported in round {rnd} (server seq "
                                                    f"{e.seq}) is not in its log (entries deleted or log truncated)"))
    return problems


def check_metrics(view: RunView, metrics: dict[str, Any], server: Logs) -> list[Problem]:
    """``metrics.json`` must be what the server's log signed and what follows from it: each
    round's row (its digest in ``round-end``), participants, model hashes, every ε (the last
    one each site released in the round), the config, the final model and the head."""
    where = "metrics.json"
    problems: list[Problem] = []
    if body_hash(metrics.get("config") or {}) != view.start.data.get("config_sha256"):
        problems.append(Problem(where, None, f"config differs from the one the run started with (server seq "
                                             f"{view.start.seq})"))
    rows = [r for r in metrics.get("rounds") or [] if isinstance(r, dict)]
    if [r.get("round") for r in rows] != sorted(view.ends):
        problems.append(Problem(where, None, f"rounds {[r.get('round') for r in rows]} are not the rounds the "
                                             f"server's log ended ({sorted(view.ends)})"))
    for row in rows:
        rnd = row.get("round")
        if rnd not in view.ends:
            continue
        signed = view.ends[rnd]
        if body_hash(row) != signed.data.get("metrics_sha256"):
            problems.append(Problem(where, None, f"round {rnd} differs from the row the server signed (server seq "
                                                 f"{signed.seq}): metrics.json was edited"))
        problems += _row_follows(view, row, rnd)
    end = view.end
    if end is not None:
        if metrics.get("final_model_sha256") != end.data.get("final_sha256"):
            problems.append(Problem(where, None, f"final_model_sha256 is not the final model of the run (server seq "
                                                 f"{end.seq})"))
        if ("ended_early" in metrics) != (end.data.get("ended_early") is not None):
            problems.append(Problem(where, None, f"ended_early disagrees with the run's end (server seq {end.seq})"))
    stopped = view.stopped
    if end is None and stopped is not None:
        if metrics.get("final_model_sha256") != stopped.data.get("final_sha256"):
            problems.append(Problem(where, None, f"final_model_sha256 is not the model the stopped run kept (server "
                                                 f"seq {stopped.seq})"))
        if not isinstance(metrics.get("stopped"), dict):
            problems.append(Problem(where, None, f"the run was stopped (server seq {stopped.seq}) but metrics.json "
                                                 "does not say so"))
    recorded = (metrics.get("audit") or {}).get("server_head")
    if recorded is None:
        problems.append(Problem(where, None, "no audit.server_head recorded"))
    elif recorded != (server.entries[-1].hash if server.entries else None):
        problems.append(Problem(server.file, None, "the log's last entry is not the head recorded in metrics.json "
                                                   "(entries removed from the end, or appended after the run)"))
    return problems


def _row_follows(view: RunView, row: dict[str, Any], rnd: int) -> list[Problem]:
    """A row's participants, model hash and ε against the round's replies and aggregate."""
    where = "metrics.json"
    problems: list[Problem] = []
    replies = {(site, phase): e for (site, r, phase), e in view.replies.items() if r == rnd}
    statuses = {site: e.data.get("status") for (site, phase), e in replies.items() if phase == "train"}
    agg = view.aggregates.get(rnd)
    expected: dict[str, Any] = {
        "sites": sorted(str(s) for s in agg.data.get("sites", [])) if agg is not None else [],
        "refused": sorted(s for s, st in statuses.items() if st == "refused"),
        "failed": sorted(s for s, st in statuses.items() if st == "failed"),
        "model_sha256": view.model_after.get(rnd),
    }
    got = {"sites": sorted(map(str, row.get("sites") or [])), "refused": sorted(map(str, row.get("refused") or [])),
           "failed": sorted(map(str, row.get("failed") or [])), "model_sha256": row.get("model_sha256")}
    for key, value in expected.items():
        if got[key] != value:
            problems.append(Problem(where, None, f"round {rnd}: {key} is not what the server's log records"))
    if agg is not None and not set(expected["sites"]) <= {s for s, st in statuses.items() if st == "trained"}:
        problems.append(Problem(where, None, f"round {rnd}: the aggregate names sites that did not train"))
    released: dict[str, Any] = {}
    for phase in ("train", "eval"):  # as the server builds the row: an evaluation's ε replaces training's
        for (site, p), e in replies.items():
            if p == phase and e.data.get("epsilon") is not None:
                released[site] = e.data["epsilon"]
    if (row.get("epsilon") or {}) != released:
        problems.append(Problem(where, None, f"round {rnd}: ε per site is not the last ε each site released in the "
                                             "round (server log)"))
    return problems


def counter_signed(server: Logs, sites: dict[str, Logs]) -> int:
    """The last server ``seq`` some given site log counter-signed (-1: none): entries after it
    are signed by the server alone."""
    seqs = {e.hash: e.seq for e in server.entries}
    heads = [seqs[h] for log in sites.values() for s in log.entries if (h := s.data.get("server_head")) in seqs]
    return max(heads, default=-1)
