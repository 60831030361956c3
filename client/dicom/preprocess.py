"""Deterministic preprocessing: pick frames, window to [0, 1], area-resize to the model size.

Window precedence (first that applies):

1. ``window`` in the site config ``[data]`` section: ``[center, width]`` in the units that
   :func:`client.dicom.read_pixels` returns (modality units; MONOCHROME1 negated);
2. the file's first (0028,1050) WindowCenter / (0028,1051) WindowWidth (for MONOCHROME1
   the centre is negated with the pixels);
3. ``fallback_window`` when set, else the frame's own minimum and maximum.

Multi-frame objects follow ``frames``: ``"middle"`` (one sample: the middle frame),
``"all"`` (every frame a separate sample of the same patient and label) or ``"reject"``
(the file is skipped with that reason). Non-square images are resized to a square
(aspect not kept), as the model's input is square.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from client.dicom.errors import NotAnImageError

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


def select_frames(pixels: np.ndarray, policy: str, name: str) -> np.ndarray:
    """Apply the multi-frame policy to ``(frames, rows, cols)``."""
    if pixels.shape[0] == 1 or policy == "all":
        return pixels
    if policy == "reject":
        raise NotAnImageError(name, f"multi-frame object ({pixels.shape[0]} frames) rejected by the site "
                              "policy data.frames = 'reject'")
    mid = pixels.shape[0] // 2
    return pixels[mid : mid + 1]


def window_for(ds: Dataset, pre: Preprocessing) -> tuple[float, float] | None:
    """``(center, width)`` by the documented precedence; ``None`` = the frame's min-max."""
    if pre.window is not None:
        return pre.window
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        if center is not None and width is not None and _first(width) > 0:
            c = _first(center)
            return (-c if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1" else c, _first(width))
    except (TypeError, ValueError, IndexError):
        pass  # a malformed VOI tag falls through to the fallback
    return pre.fallback_window


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS element."""
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def apply_window(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI window to [0, 1] (values outside the window are clipped)."""
    lo = center - width / 2.0
    return np.clip((pixels - lo) / max(width, 1e-6), 0.0, 1.0).astype(np.float32)


def prepare(frames: np.ndarray, window: tuple[float, float] | None, size: int) -> np.ndarray:
    """Window then area-resize ``(F, rows, cols)`` float32 to ``(F, size, size)`` in [0, 1].

    Clipping to the window happens at full resolution; the affine map to [0, 1] commutes
    with area averaging, so it is applied after the resize (same result, 60x fewer values).
    """
    out = np.empty((frames.shape[0], size, size), dtype=np.float32)
    for i, frame in enumerate(frames):
        if window is None:
            lo, hi = float(frame.min()), float(frame.max())
        else:
            lo, hi = window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
        small = resize(np.clip(frame, lo, hi)[None], size)[0]
        small -= np.float32(lo)
        small *= np.float32(1.0 / max(hi - lo, 1e-6))
        np.clip(small, 0.0, 1.0, out=out[i])
    return out


def resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(F, rows, cols)`` to ``(F, size, size)`` by exact area averaging."""
    f, rows, cols = frames.shape
    frames = frames.astype(np.float32, copy=False)
    if (rows, cols) == (size, size):
        return frames.copy()
    if rows % size == 0 and cols % size == 0:
        r, c = rows // size, cols // size
        summed = frames.reshape(f, size, r, cols).sum(axis=2).reshape(f, size, size, c).sum(axis=3)
        summed *= np.float32(1.0 / (r * c))
        return summed
    return np.einsum("sr,frc,tc->fst", _area_weights(rows, size), frames, _area_weights(cols, size),
                     optimize=True).astype(np.float32)


@lru_cache(maxsize=64)
def _area_weights(n: int, size: int) -> np.ndarray:
    """``(size, n)`` matrix: the share of each input pixel in each output pixel's area."""
    edges_out = np.arange(size + 1) * (n / size)
    lo = np.maximum(edges_out[:-1, None], np.arange(n)[None])
    hi = np.minimum(edges_out[1:, None], np.arange(n)[None] + 1)
    w = np.clip(hi - lo, 0.0, None) / (n / size)
    return w.astype(np.float32)
