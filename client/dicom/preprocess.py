"""Deterministic preprocessing: pick frames, area-resize to the model size, window to [0, 1].

Window precedence (first that applies):

1. ``window`` in the site config ``[data]`` section: ``[center, width]`` in the units that
   :func:`client.dicom.read_pixels` returns (modality units; MONOCHROME1 negated);
2. the file's first (0028,1050) WindowCenter / (0028,1051) WindowWidth (for MONOCHROME1
   the centre is negated with the pixels);
3. ``fallback_window`` when set, else the frame's own minimum and maximum.

Multi-frame objects follow ``frames``: ``"middle"`` (one sample: the middle frame),
``"all"`` (every frame a separate sample of the same patient and label) or ``"reject"``
(the file is skipped with that reason). Non-square images are resized to a square
(aspect not kept), as the model's input is square. Resizing (exact area averaging of
modality values) comes before the window: see :func:`prepare`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from pydicom.dataset import Dataset

from client.dicom import header
from client.dicom.errors import NotAnImageError
from client.dicom.reader import Linear

FRAME_POLICIES = ("middle", "all", "reject")


@dataclass(frozen=True)
class Preprocessing:
    """How modality values become model inputs (see the module doc for the rules)."""

    image_size: int = 64
    window: tuple[float, float] | None = None
    fallback_window: tuple[float, float] | None = None
    frames: str = "middle"

    def __post_init__(self) -> None:
        if self.frames not in FRAME_POLICIES:
            raise ValueError(f"frames policy must be one of {FRAME_POLICIES}, not {self.frames!r}")
        if self.image_size < 4:
            raise ValueError("image_size must be at least 4")

    def key(self) -> str:
        """Short stable hash used to key caches."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def frame_index(frames: int, policy: str, name: str) -> int | None:
    """The one frame to decode under the multi-frame ``policy`` (0-based), or ``None`` for
    every frame; raises when the policy rejects the object."""
    if frames == 1 or policy == "all":
        return None
    if policy == "reject":
        raise NotAnImageError(name, f"multi-frame object ({frames} frames) rejected by the site "
                              "policy data.frames = 'reject'")
    return frames // 2


def window_for(ds: Dataset, pre: Preprocessing) -> tuple[float, float] | None:
    """``(center, width)`` by the documented precedence; ``None`` = the frame's min-max."""
    if pre.window is not None:
        return pre.window
    try:
        center, width = header.number(ds, "WindowCenter"), header.number(ds, "WindowWidth")
        if center is not None and width is not None and width > 0 and math.isfinite(center + width):
            return (-center if header.text(ds, "PhotometricInterpretation") == "MONOCHROME1" else center, width)
    except (TypeError, ValueError, IndexError):
        pass  # a malformed VOI tag falls through to the fallback
    return pre.fallback_window


def apply_window(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window to [0, 1] (values outside the window are clipped)."""
    lo = center - width / 2.0
    return np.clip((pixels - lo) / max(width, 1e-6), 0.0, 1.0).astype(np.float32)


def prepare(frames: np.ndarray, window: tuple[float, float] | None, size: int) -> np.ndarray:
    """Area-resize ``(F, rows, cols)`` modality values to ``(F, size, size)``, then window to [0, 1].

    Resizing first is what a coarser scanner would measure (each output pixel is the mean
    value over its area, the partial-volume effect), and it is 60x cheaper: the window and
    clip run on the small image. ``window=None``: each resized frame's own min-max.
    """
    return _window(resize(frames, size), window)


def prepare_linear(linear: Linear, window: tuple[float, float] | None, size: int) -> np.ndarray:
    """:func:`prepare` of ``linear.values()``, resizing the stored integers directly (the
    modality map is affine, so it commutes with area averaging)."""
    small = resize(linear.stored, size)
    if linear.slope != 1:
        small *= np.float32(linear.slope)
    if linear.intercept:
        small += np.float32(linear.intercept)
    return _window(small, window)


def _window(small: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    for frame in small:
        if window is None:
            lo, hi = float(frame.min()), float(frame.max())
        else:
            lo, hi = window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
        frame -= np.float32(lo)
        frame *= np.float32(1.0 / max(hi - lo, 1e-6))
    np.clip(small, 0.0, 1.0, out=small)
    return small


def resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(F, rows, cols)`` to ``(F, size, size)`` by exact area averaging."""
    f, rows, cols = frames.shape
    if (rows, cols) == (size, size):
        return frames.astype(np.float32)
    if rows % size == 0:  # whole row blocks: sum them straight from the stored dtype, then columns by matmul
        r = rows // size
        summed = frames.reshape(f, size, r, cols).sum(axis=2, dtype=np.float64 if frames.itemsize > 2 else np.float32)
        out = (summed.astype(np.float32, copy=False) @ _area_weights(cols, size).T).astype(np.float32, copy=False)
        out *= np.float32(1.0 / r)
        return out
    return np.einsum("sr,frc,tc->fst", _area_weights(rows, size), frames.astype(np.float32, copy=False),
                     _area_weights(cols, size), optimize=True).astype(np.float32)


@lru_cache(maxsize=64)
def _area_weights(n: int, size: int) -> np.ndarray:
    """``(size, n)`` matrix: the share of each input pixel in each output pixel's area."""
    edges_out = np.arange(size + 1) * (n / size)
    lo = np.maximum(edges_out[:-1, None], np.arange(n)[None])
    hi = np.minimum(edges_out[1:, None], np.arange(n)[None] + 1)
    w = np.clip(hi - lo, 0.0, None) / (n / size)
    return w.astype(np.float32)
