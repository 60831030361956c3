"""Read one DICOM file into float32 pixels in modality units."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from client.dicom.errors import DicomReadError


def read_image(path: str | Path) -> tuple[pydicom.Dataset, np.ndarray]:
    """Read ``path`` and return its dataset and pixels (see :func:`read_pixels`)."""
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for malformed files
        raise DicomReadError(str(path), f"cannot decode pixels ({type(exc).__name__})") from None
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomReadError(str(path), "colour image (SamplesPerPixel > 1) is not supported")
    out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = out.max() + out.min() - out
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return ds, (out.reshape(frames, *out.shape[-2:]) if frames > 1 else out[None])


def read_pixels(path: str | Path) -> np.ndarray:
    """Return the image in ``path`` as float32 ``(frames, rows, cols)`` in modality units.

    The modality LUT (rescale slope/intercept) is applied and MONOCHROME1 images are
    inverted so that a larger value always means brighter/denser.

    Raises
    ------
    DicomReadError
        When the file cannot be read as a grayscale image; the reason names the cause.
    """
    return read_image(path)[1]
