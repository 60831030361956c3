"""Weighted federated averaging of model updates."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> OrderedDict[str, np.ndarray]:
    """Weighted average of named arrays; weights are normalised to sum to one."""
    if not updates:
        raise ValueError("weighted_mean needs at least one update")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = w / w.sum()
    return OrderedDict(
        (k, sum(wi * np.asarray(u[k], dtype=np.float64) for wi, u in zip(w, updates, strict=True)).astype(np.float32))
        for k in updates[0]
    )


def apply_update(arrays: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """Global arrays plus the aggregated update (same names, same order)."""
    return OrderedDict((k, (arrays[k] + update[k]).astype(arrays[k].dtype)) for k in arrays)
