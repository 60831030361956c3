"""The run's initial global model: freshly built from the run's seed, or local weights the operator gave.

``init_weights`` names a local ``.npz`` or ``.safetensors`` file (never downloaded; neither format can
carry code: npz is read with ``allow_pickle=False``). Its arrays must be exactly the network's
``state_dict`` (names, shapes; cast to the network's dtypes); its sha256 goes into the run-start
entry of the server's audit log.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from client.models import build_model, get_arrays
from privacy.errors import InputError
from privacy.protocol import parse_findings, parse_windows
from server.config import RunConfig


class InitWeightsError(InputError, ValueError):
    """The initial-weights file is missing, unreadable or does not fit the run's network."""


def _read(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    raise InitWeightsError(f"init-weights {path}: use a .npz or .safetensors file (got {path.suffix or 'no suffix'!r})")


def initial_model(cfg: RunConfig) -> tuple[OrderedDict[str, np.ndarray], str]:
    """``(arrays, sha256 of the weights file or "")`` of the run's starting global model."""
    fresh = get_arrays(build_model(cfg.model, seed=cfg.seed, outputs=max(1, len(parse_findings(cfg.findings))),
                                   in_channels=max(1, len(parse_windows(cfg.window)))))
    if not cfg.init_weights:
        return fresh, ""
    path = Path(cfg.init_weights)
    if not path.is_file():
        raise InitWeightsError(f"init-weights {path} does not exist: give the path of a local .npz or .safetensors file")
    raw = path.read_bytes()
    try:
        loaded = _read(path)
    except InitWeightsError:
        raise
    except Exception as exc:  # numpy and safetensors raise several types for a damaged file
        raise InitWeightsError(f"init-weights {path} cannot be read as {path.suffix} ({type(exc).__name__}); "
                               "re-export the weights") from None
    missing, unknown = sorted(set(fresh) - set(loaded)), sorted(set(loaded) - set(fresh))
    if missing or unknown:
        raise InitWeightsError(f"init-weights {path} does not fit model {cfg.model!r}: {len(missing)} array(s) missing "
                               f"(e.g. {missing[:2]}), {len(unknown)} unknown (e.g. {unknown[:2]}); export the "
                               "state_dict of the same network with the same number of findings")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, want in fresh.items():
        got = loaded[name]
        if got.shape != want.shape or got.dtype.kind != "f" or not np.isfinite(got).all():
            raise InitWeightsError(f"init-weights {path}: array {name!r} has shape {got.shape} {got.dtype}, the network "
                                   f"needs {want.shape} finite floating point")
        out[name] = got.astype(want.dtype, copy=True)
    return out, hashlib.sha256(raw).hexdigest()
