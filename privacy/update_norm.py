"""The L2 norm of a model update, and clipping an update to a norm bound (site and server use both)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all arrays together (float64)."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values()))


def clip_to_norm(update: Mapping[str, np.ndarray], bound: float) -> tuple[OrderedDict[str, np.ndarray], float]:
    """``update`` scaled down to L2 norm ``bound`` when above it, and its norm before; ``bound <= 0``: unchanged."""
    norm = l2_norm(update)
    scale = bound / norm if bound > 0 and norm > bound else 1.0
    return OrderedDict((k, (np.asarray(v) * scale).astype(np.asarray(v).dtype)) for k, v in update.items()), norm
