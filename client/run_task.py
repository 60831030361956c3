"""The run an attack at a site is about: its task (network, size, training recipe) and its final
global model, read from the run directory the site received."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from client.models import build_model, set_arrays
from privacy.protocol import RUN_ID_PATTERN, RoundRequestError, checked_model, parse_findings, parse_windows

MAX_STEPS = 100_000  # a reference model's training, whatever the run's config claims


@dataclass(frozen=True)
class RunTask:
    """What the attacks need to know of a run (read from its metrics.json ``config``)."""

    run_id: str
    model: str
    image_size: int
    window: str
    findings: str
    rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    optimizer: str
    seed: int

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> tuple[RunTask, OrderedDict[str, np.ndarray]]:
        """The run's task and its final global model (``model-final.npz``)."""
        run_dir = Path(run_dir)
        metrics, final = run_dir / "metrics.json", run_dir / "model-final.npz"
        for path in (metrics, final):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: attack a finished run directory (simulate or run wrote it)")
        doc = json.loads(metrics.read_text())
        c = doc.get("config") or {}
        try:
            task = cls(run_id=str(doc.get("run_id", "")), model=str(c["model"]), image_size=int(c["image_size"]),
                       window=str(c.get("window", "")), findings=str(c.get("findings", "")),
                       rounds=len(doc.get("rounds", [])) or int(c["num_server_rounds"]),
                       local_steps=int(c["local_steps"]), batch_size=int(c["batch_size"]),
                       learning_rate=float(c["learning_rate"]), optimizer=str(c.get("optimizer", "adam")),
                       seed=int(c.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{metrics}: config field {exc} is missing or malformed") from None
        if task.rounds * task.local_steps > MAX_STEPS:
            raise ValueError(f"{metrics}: {task.rounds} rounds of {task.local_steps} local steps: the attacks' reference "
                             f"models train at most {MAX_STEPS} steps")
        if not RUN_ID_PATTERN.match(task.run_id):  # it names the site's result files
            raise ValueError(f"{metrics}: run_id must be 1-64 letters, digits, '.', '_' or '-' (the server wrote "
                             "another value: do not attack this directory)")
        with np.load(final, allow_pickle=False) as npz:
            arrays = OrderedDict((k, npz[k]) for k in npz.files)
        try:  # the server's file: the same checks as a global model a round brings
            return task, checked_model(arrays)
        except RoundRequestError as exc:
            raise ValueError(f"{final}: {exc}; the attacks do not run on it") from None

    @property
    def windows(self) -> tuple[tuple[float, float], ...]:
        return parse_windows(self.window)

    @property
    def finding_names(self) -> tuple[str, ...]:
        return parse_findings(self.findings)

    def network(self, arrays: dict[str, np.ndarray] | None = None, *, factories: tuple[str, ...] = ()) -> nn.Module:
        """The run's network, holding ``arrays`` (default: its initial weights, from the run's seed)."""
        model = build_model(self.model, seed=self.seed, outputs=max(1, len(self.finding_names)),
                            in_channels=max(1, len(self.windows)), factories=factories)
        if arrays is not None:
            set_arrays(model, arrays)
        return model
