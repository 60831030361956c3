"""Where a stopped or crashed run continues (``--resume RUN_DIR``), read from its signed log.

The server's audit log is the truth: the run continues from the model after the last
``aggregate-applied`` round (its checkpoint must hash to what the log signed), at the round after
the last one that *started*. A round that started but never ended is abandoned: its number is not
reused, because every site answers a request once (a site that trained it has counted its ε;
training it again under the same number would be refused), and nothing of it is applied. The rows of
``metrics.json`` are the rounds the log ended. A finished run (``run-end``) is not resumed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privacy.audit.crosscheck import load_metrics
from privacy.audit.events import SERVER_ACTOR, E
from privacy.audit.verify import check_chain, segment_files
from privacy.errors import InputError, IntegrityError
from privacy.files import LockTimeout, exclusive_lock
from privacy.keys import load_private_key
from privacy.model_arrays import arrays_sha256
from server.audit_trail import AUDIT_FILE, SERVER_KEY
from server.config import RunConfig
from server.initial_model import initial_model
from server.rundir import load_npz, private_keys_dir

LOCK_FILE = "run.lock"


class ResumeError(InputError, ValueError):
    """The run directory cannot be resumed as it is; the message says why and what to do."""


class ResumeIntegrityError(IntegrityError, ValueError):
    """The run directory's log or checkpoint does not hold what it must: resuming would lie."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues."""

    run_id: str
    config: RunConfig
    metrics: dict[str, Any]  # metrics.json with only the rounds the log ended
    arrays: OrderedDict[str, np.ndarray]  # the model after ``last_round`` (the initial model if none)
    next_round: int
    last_round: int  # the last applied round (0 = none)
    abandoned: int | None  # the round that started and never ended


@contextmanager
def run_lock(run_dir: Path, *, wait: float = 10.0) -> Iterator[None]:
    """Hold ``RUN_DIR/run.lock`` while a server process runs (or resumes) the run: a second process
    (a resume while the first still runs, two ``flwr run`` into one directory) is refused. The lock
    goes with its process, so a crashed run can be resumed at once."""
    with ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(Path(run_dir) / LOCK_FILE, timeout=wait))
        except LockTimeout:
            raise ResumeError(f"{run_dir} is being run by another server process (it holds {LOCK_FILE}): stop "
                              "that process first (a resumed run must be the only one writing its log)") from None
        yield


def resume_point(run_dir: Path, initial: OrderedDict[str, np.ndarray] | None = None) -> ResumePoint:
    """Read ``run_dir``; ``initial``: the run's initial model (used only when no round was applied;
    default: built from the run's config; it must hash to the log's ``initial_sha256``)."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise ResumeError(f"{metrics_file} is missing: {run_dir} is not a medfed run directory (or the run never "
                          "started); start a new run instead")
    metrics = load_metrics(metrics_file)
    try:
        config = RunConfig(**metrics["config"])
        run_id = str(metrics["run_id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ResumeError(f"{metrics_file}: its run config or run id is missing or malformed ({type(exc).__name__}); "
                          "the file was edited: restore it, or start a new run") from None
    key_file = Path(config.audit_key) if config.audit_key else private_keys_dir(run_dir) / SERVER_KEY
    if not key_file.is_file():
        raise ResumeError(f"{key_file}: the server's audit key of this run is missing; the run continues only under "
                          "the key that signed it (restore the file, or start a new run)")
    chain = check_chain(segment_files(run_dir / AUDIT_FILE), load_private_key(key_file).public_key(), SERVER_ACTOR)
    if chain.problems:
        raise ResumeIntegrityError(f"{run_dir / AUDIT_FILE}: {chain.problems[0]} (resuming needs an intact "
                                   "log: run medfed-audit verify)")
    mine = [e for e in chain.entries if e.data.get("run_id") == run_id]
    if not any(e.event == E.RUN_START for e in mine):
        raise ResumeIntegrityError(f"{run_dir / AUDIT_FILE}: run {run_id} of metrics.json never started in this log")
    if any(e.event == E.RUN_END for e in mine):
        raise ResumeError(f"{run_dir}: run {run_id} finished (its log has run-end); nothing to resume: start a new "
                          "run, e.g. with --init-weights RUN_DIR/model-final.npz")
    started = [int(e.data["round"]) for e in mine if e.event == E.ROUND_START]
    ended = {int(e.data["round"]) for e in mine if e.event == E.ROUND_END}
    applied = [e for e in mine if e.event == E.AGGREGATE]
    start = next(e for e in mine if e.event == E.RUN_START)
    last_round = int(applied[-1].data["round"]) if applied else 0
    if applied:
        want = str(applied[-1].data["new_sha256"])
        path = run_dir / "checkpoints" / f"round-{last_round}.npz"
        try:
            arrays = OrderedDict(load_npz(path))
        except (OSError, ValueError) as exc:
            raise ResumeIntegrityError(f"{path}: cannot be loaded ({exc}); the run cannot continue from round "
                                       f"{last_round}") from None
    else:
        want = str(start.data["initial_sha256"])
        if initial is None:
            initial = initial_model(config)[0]
        arrays = initial
    if arrays_sha256(arrays) != want:
        raise ResumeIntegrityError(f"the model to continue from (after round {last_round}) does not hash to what the "
                                   "server's log signed: the checkpoint (or --init-weights file) was changed")
    abandoned = max(started) if started and max(started) not in ended else None
    metrics = {**metrics, "rounds": [r for r in metrics.get("rounds", []) if r.get("round") in ended]}
    return ResumePoint(run_id=run_id, config=config, metrics=metrics, arrays=arrays,
                       next_round=max(started, default=0) + 1, last_round=last_round, abandoned=abandoned)
