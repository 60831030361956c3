"""The run directory contract: metrics.json, checkpoints, final model (atomic writes)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from privacy.errors import IntegrityError
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


class CheckpointError(IntegrityError, ValueError):
    """A checkpoint or its sidecar is missing, damaged or does not match."""


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Load a checkpoint, verifying it against its sidecar's sha256 (never unpickling)."""
    side = path.with_suffix(".json")
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
        want, keys = str(sidecar["sha256"]), [str(k) for k in sidecar["keys"]]
        data = path.read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: the checkpoint or its sidecar {side.name} cannot be read "
                              f"({type(exc).__name__}); restore both from a copy") from None
    if hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"{path}: sha256 does not match {side.name}; the file is damaged")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # a sidecar that matches a non-checkpoint
        raise CheckpointError(f"{path}: not a medfed checkpoint ({type(exc).__name__})") from None


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
