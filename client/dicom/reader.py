"""Read one DICOM file into float32 pixels in modality units.

Rules (documented in ``docs/data.md``):

- grayscale (MONOCHROME1/2): stored values -> modality LUT (Rescale Slope/Intercept or
  Modality LUT Sequence). MONOCHROME1 is **negated** after the modality LUT, so a
  larger value always means brighter/denser; a VOI window from the file moves with it
  (centre ``c`` becomes ``-c``).
- colour (RGB, YBR_* decoded to RGB by pydicom, PALETTE COLOR through its palette):
  converted to grayscale by ITU-R BT.601 luma ``Y = 0.299 R + 0.587 G + 0.114 B``.
- no pixel data (SR, RT plan, presentation state, waveform, DICOMDIR) or not DICOM at
  all: :class:`NotAnImageError` (the preflight counts it as *skipped*).
- anything else that cannot be decoded: :class:`CorruptFileError` or
  :class:`UnsupportedImageError` with a reason that never quotes a header value.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from client.dicom.errors import CorruptFileError, NotAnImageError, UnsupportedImageError

NATIVE_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                             DeflatedExplicitVRLittleEndian})
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
MAX_SAMPLES = 1 << 30  # refuse headers that claim more than 1 Gi samples (corrupt or hostile)

# pydicom logs and warns with the offending header value ("Invalid value for VR PN: ...");
# a site process must never write a header value anywhere, so its value validation is off
# and its logger silent. Our own errors say what is wrong without quoting values.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


def parse(source: str | Path | bytes, name: str) -> Dataset:
    """Parse a file (path or its bytes) into a dataset, classifying what is not DICOM.

    Files without file meta are accepted (``force``); their transfer syntax is taken
    from the encoding pydicom detected.
    """
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    has_preamble = raw[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(raw), force=True)
            ds.get("SOPClassUID")  # force parsing of the header elements we use
    except Exception as exc:  # pydicom raises many types for malformed input
        if has_preamble:
            raise CorruptFileError(name, f"header cannot be parsed ({type(exc).__name__}); "
                                   "the file is truncated or damaged, export it again") from None
        raise NotAnImageError(name, "not a DICOM file") from None
    if not has_preamble and "SOPClassUID" not in ds and not any(k in ds for k in PIXEL_KEYWORDS):
        raise NotAnImageError(name, "not a DICOM file")
    _fill_transfer_syntax(ds)
    return ds


def _fill_transfer_syntax(ds: Dataset) -> None:
    meta = ds.file_meta if hasattr(ds, "file_meta") else None
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


def syntax_name(ds: Dataset) -> str:
    """Human name of the dataset's transfer syntax."""
    uid = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if hasattr(ds, "file_meta") else UID("")
    return uid.name if uid.is_valid else "unknown"


def photometric(ds: Dataset) -> str:
    """Photometric interpretation, upper case, stripped."""
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()


def check_image(ds: Dataset, name: str) -> tuple[int, int, int]:
    """Return ``(frames, rows, cols)`` or raise why the object is not a usable image."""
    sop = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise NotAnImageError(name, "DICOMDIR (media directory, no image)")
    if not any(k in ds for k in PIXEL_KEYWORDS):
        kind = UID(sop).name if sop and UID(sop).is_valid else "object"
        raise NotAnImageError(name, f"{kind} without pixel data (not an image)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception as exc:
        raise CorruptFileError(name, f"image header incomplete or invalid ({type(exc).__name__} in "
                               "Rows/Columns/NumberOfFrames/SamplesPerPixel)") from None
    if min(rows, cols, frames) < 1 or samples not in (1, 3) or rows * cols * frames * samples > MAX_SAMPLES:
        raise CorruptFileError(name, "implausible image geometry in Rows/Columns/NumberOfFrames/SamplesPerPixel")
    return frames, rows, cols


def _native_stored(ds: Dataset, frames: int, rows: int, cols: int) -> np.ndarray | None:
    """Stored values of uncompressed single-sample integer pixel data, without pydicom's
    generic decoder (3x faster); ``None`` when the fast path does not apply."""
    if (ds.file_meta.get("TransferSyntaxUID") not in NATIVE_SYNTAXES or "PixelData" not in ds
            or int(ds.get("SamplesPerPixel", 1)) != 1):
        return None
    bits, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0) or 0)
    if bits not in (8, 16, 32) or not 0 < stored <= bits:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    big = ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    dtype = np.dtype(f"{'>' if big else '<'}{'i' if signed else 'u'}{bits // 8}")
    count = frames * rows * cols
    data = ds.PixelData
    if len(data) < count * dtype.itemsize:
        raise ValueError("pixel data shorter than the header says")
    arr = np.frombuffer(data, dtype=dtype, count=count).reshape(frames, rows, cols)
    if stored < bits:  # unused high bits: sign-extend or mask, as pydicom does
        shift = bits - stored
        arr = np.right_shift(np.left_shift(arr.astype(dtype.newbyteorder("=")), shift), shift)
    return arr


def decode(ds: Dataset, name: str) -> np.ndarray:
    """Pixels as float32 ``(frames, rows, cols)``: modality units or luma (see module doc)."""
    frames, rows, cols = check_image(ds, name)
    pi = photometric(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = _native_stored(ds, frames, rows, cols) if pi.startswith("MONOCHROME") else None
            if stored is None:
                stored = ds.pixel_array
            if pi == "PALETTE COLOR":
                stored = apply_color_lut(stored, ds)
            if pi.startswith("MONOCHROME"):
                out = _modality(stored, ds)
                if pi == "MONOCHROME1":
                    np.negative(out, out=out)
            else:
                out = stored.astype(np.float32, copy=False) @ LUMA
            return np.ascontiguousarray(out, dtype=np.float32).reshape(frames, rows, cols)
    except Exception as exc:
        raise _decode_error(ds, name, exc) from None


def _modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    out = stored.astype(np.float32)
    if slope != 1:
        out *= np.float32(slope)
    if intercept:
        out += np.float32(intercept)
    return out


def _decode_error(ds: Dataset, name: str, exc: Exception) -> Exception:
    text = str(exc)
    if "shorter" in text or "less than expected" in text:
        return CorruptFileError(name, "pixel data shorter than the header says (truncated file?); export it again")
    if "no pixel data decoders" in text.lower() or "missing required dependencies" in text.lower() \
            or "no decoders" in text.lower():
        return UnsupportedImageError(name, f"no decoder installed for {syntax_name(ds)}")
    return CorruptFileError(name, f"pixel data cannot be decoded as {syntax_name(ds)} "
                            f"({type(exc).__name__}); export it again or uncompressed")


def read_image(path: str | Path) -> tuple[Dataset, np.ndarray]:
    """Read ``path`` and return its dataset and pixels (see :func:`read_pixels`)."""
    name = str(path)
    try:
        ds = parse(Path(path), name)
    except OSError as exc:
        raise CorruptFileError(name, f"cannot read the file ({type(exc).__name__}); check permissions") from None
    return ds, decode(ds, name)


def read_pixels(path: str | Path) -> np.ndarray:
    """Return the image in ``path`` as float32 ``(frames, rows, cols)`` in modality units.

    The modality LUT (rescale slope/intercept) is applied and MONOCHROME1 images are
    negated so that a larger value always means brighter/denser; colour images become
    BT.601 luma.

    Raises
    ------
    DicomReadError
        When the file cannot be read as a grayscale image; the reason names the cause.
        :class:`NotAnImageError` (a subclass) marks objects to skip (SR, RT plan, DICOMDIR).
    """
    return read_image(path)[1]
