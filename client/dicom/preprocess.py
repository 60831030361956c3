"""Deterministic preprocessing: window to [0, 1] and resize to the model's input size."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocessing:
    """How raw modality values become model inputs.

    Window precedence: ``window`` set in the site config wins; otherwise the file's
    first (0028,1050) WindowCenter / (0028,1051) WindowWidth; otherwise ``fallback_window``.
    """

    image_size: int = 64
    window: tuple[float, float] | None = None
    fallback_window: tuple[float, float] = (-600.0, 1500.0)

    def key(self) -> str:
        """Short stable hash used to key caches."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def apply_window(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window to [0, 1] (values outside the window are clipped)."""
    lo = center - width / 2.0
    return np.clip((pixels - lo) / max(width, 1e-6), 0.0, 1.0).astype(np.float32)


def resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(frames, rows, cols)`` to ``(frames, size, size)`` by area averaging."""
    if frames.shape[-2:] == (size, size):
        return frames.astype(np.float32, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None]
    return F.interpolate(t, size=(size, size), mode="area")[:, 0].numpy()
