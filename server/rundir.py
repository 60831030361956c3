"""The run directory contract: metrics.json, checkpoints, final model (atomic writes)."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from privacy.files import atomic_write_bytes, atomic_write_json
from privacy.model_arrays import arrays_sha256


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray], meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **dict(arrays))  # type: ignore[arg-type]
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    sidecar = {**meta, "sha256": hashlib.sha256(data).hexdigest(),
               "arrays_sha256": arrays_sha256(arrays), "keys": list(arrays)}
    atomic_write_json(path.with_suffix(".json"), sidecar)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load a checkpoint, verifying it against its sidecar's sha256."""
    sidecar = json.loads(path.with_suffix(".json").read_text())
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sidecar["sha256"]:
        raise ValueError(f"{path}: sha256 does not match {path.with_suffix('.json')}; the file is damaged")
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in sidecar["keys"]}


def private_keys_dir(run_dir: Path) -> Path:
    """Where a run's private keys live unless the operator names another place: beside the run
    directory (``RUN.keys/``, 0700), never inside it. A run directory is what an auditor receives,
    and keys found there prove nothing (``medfed-audit verify`` ignores them unless told)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.with_name(run_dir.name + ".keys")


class RunDir:
    """Writes one run's outputs under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "checkpoints").mkdir(exist_ok=True)

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    def checkpoint(self, round_: int, arrays: Mapping[str, np.ndarray]) -> Path:
        path = self.root / "checkpoints" / f"round-{round_}.npz"
        _save_npz(path, arrays, {"round": round_})
        return path

    def final(self, round_: int, arrays: Mapping[str, np.ndarray]) -> Path:
        path = self.root / "model-final.npz"
        _save_npz(path, arrays, {"round": round_})
        return path

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.metrics_file, metrics)
