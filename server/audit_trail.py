"""What the server writes to its signed audit log during a run (``RUN_DIR/audit.jsonl``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from privacy.audit.events import SERVER_ACTOR, E
from privacy.audit.fingerprint import versions
from privacy.audit.log import AuditLog, body_hash, read_entries
from privacy.audit.verify import segment_files
from privacy.bundle import installed_digest
from privacy.keys import load_or_create_key
from privacy.model_arrays import arrays_sha256
from privacy.protocol import parse_findings
from server.config import RunConfig
from server.rundir import private_keys_dir

AUDIT_FILE = "audit.jsonl"
SERVER_KEY = "server.key"


class ServerAudit:
    """The server's audit log for one run; every call appends one signed entry."""

    def __init__(self, cfg: RunConfig, run_id: str) -> None:
        run_dir = Path(cfg.run_dir)
        key = load_or_create_key(Path(cfg.audit_key) if cfg.audit_key else private_keys_dir(run_dir) / SERVER_KEY)
        self.log = AuditLog(run_dir / AUDIT_FILE, SERVER_ACTOR, key)
        self.run_id = run_id
        # a resumed run counts its earlier entries too
        self.entries = sum(1 for f in segment_files(self.log.path) for e in read_entries(f)
                           if e.data.get("run_id") == run_id)

    def _add(self, event: str, **data: Any) -> None:
        self.log.append(event, {"run_id": self.run_id, **data})
        self.entries += 1

    def run_start(self, cfg: RunConfig, initial: Mapping[str, np.ndarray], *, init_weights_sha256: str = "") -> None:
        """``init_weights_sha256``: the file the initial model was loaded from ("" = built from the seed)."""
        self._add(E.RUN_START, config_sha256=body_hash(cfg.to_dict()), code_sha256=installed_digest(),
                  versions=versions(), initial_sha256=arrays_sha256(initial), rounds=cfg.num_server_rounds,
                  dp=cfg.dp, secure_aggregation=cfg.secure_aggregation, model=cfg.model,
                  findings=list(parse_findings(cfg.findings)),
                  init_weights_sha256=init_weights_sha256 or None)

    def round_start(self, rnd: int, arrays: Mapping[str, np.ndarray], nodes: list[int]) -> None:
        self._add(E.ROUND_START, round=rnd, global_sha256=arrays_sha256(arrays), nodes=[str(n) for n in nodes])

    def reply(self, rnd: int, site: str, status: str, site_head: str | None = None,
              epsilon: float | None = None) -> None:
        self._add(E.SITE_REPLY, round=rnd, site=site, status=status, site_head=site_head, epsilon=epsilon)

    def secure_aggregation(self, rnd: int, info: dict[str, Any]) -> None:
        self._add(E.SECAGG, round=rnd, sites=info.get("sites"), dropped=info.get("dropped"),
                  aborted=bool(info.get("aborted")), k=info.get("k"), threshold=info.get("threshold"),
                  dropped_at=info.get("dropped_at") or {})

    def aggregate(self, rnd: int, sites: list[str], arrays: Mapping[str, np.ndarray]) -> None:
        self._add(E.AGGREGATE, round=rnd, sites=sites, new_sha256=arrays_sha256(arrays))

    def aggregate_rejected(self, rnd: int, norm: float, bound: float) -> None:
        """The secure aggregate's norm exceeded the run's update-norm bound: not applied."""
        self._add(E.AGGREGATE_REJECTED, round=rnd, norm=norm, bound=bound)

    def checkpoint(self, rnd: int, file: str, arrays: Mapping[str, np.ndarray]) -> None:
        self._add(E.CHECKPOINT, round=rnd, file=file, sha256=arrays_sha256(arrays))

    def round_end(self, rnd: int, row: dict[str, Any]) -> None:
        """The digest of the round's row of ``metrics.json`` (JSON values), signed: verify checks the file's row."""
        self._add(E.ROUND_END, round=rnd, metrics_sha256=body_hash(row))

    def run_end(self, rounds: int, arrays: Mapping[str, np.ndarray], ended_early: int | None = None) -> None:
        """``ended_early``: the round every site refused, when the run stopped there."""
        self._add(E.RUN_END, rounds=rounds, final_sha256=arrays_sha256(arrays), ended_early=ended_early)

    def run_stopped(self, reason: str, last_round: int, arrays: Mapping[str, np.ndarray],
                    abandoned: int | None) -> None:
        """The operator stopped the run: ``arrays`` (after ``last_round``) is model-final.npz; the
        round ``abandoned`` (started, never ended) is not applied and its number is not reused."""
        self._add(E.RUN_STOPPED, reason=reason, round=last_round, final_sha256=arrays_sha256(arrays),
                  abandoned=abandoned)

    def run_resumed(self, next_round: int, arrays: Mapping[str, np.ndarray], abandoned: int | None) -> None:
        """The run continues at ``next_round`` from ``arrays`` (the model after its last applied round)."""
        self._add(E.RUN_RESUMED, next_round=next_round, global_sha256=arrays_sha256(arrays), abandoned=abandoned)

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` records so that truncating the log is detectable."""
        return {"log": AUDIT_FILE, "server_head": self.log.head(), "entries_this_run": self.entries}
