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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from client.dicom import header
from client.dicom.errors import CorruptFileError, DicomReadError, NotAnImageError, UnsupportedImageError

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
MAX_SAMPLES = 1 << 30  # refuse headers that claim more than 1 Gi samples (corrupt or hostile)
DEFER_BYTES = 16384  # values larger than this stay in the parsed bytes until used (Pixel Data)
PIXEL_DATA_TAG = 0x7FE00010



def quiet_pydicom() -> None:
    """pydicom logs and warns with the offending header value ("Invalid value for VR PN: ...");
    a site process must never write a header value anywhere, so its value validation is off and
    its logger silent while medfed reads DICOM. pydicom keeps both per process (its documented
    ``config.settings`` and logger), so :func:`parse`, the one place medfed reads DICOM, sets them
    before every read, in every process that reads (ingest workers included), rather than an
    import doing it behind the caller's back. Our own errors say what is wrong without quoting values."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)


def parse(source: str | Path | bytes, name: str) -> Dataset:
    """Parse a file (path or its bytes) into a dataset, classifying what is not DICOM.

    Files without file meta are accepted (``force``); their transfer syntax is taken
    from the encoding pydicom detected. Values over ``DEFER_BYTES`` (Pixel Data) stay
    deferred in the parsed bytes until used.
    """
    quiet_pydicom()
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    has_preamble = raw[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(raw), force=True, defer_size=DEFER_BYTES)
            if _syntax(ds) == DeflatedExplicitVRLittleEndian:  # deferred offsets would point into the
                ds = pydicom.dcmread(io.BytesIO(raw), force=True)  # inflated copy, not ``raw``
    except Exception as exc:  # pydicom raises many types for malformed input
        if has_preamble:
            raise CorruptFileError(name, f"header cannot be parsed ({type(exc).__name__}); "
                                   "the file is truncated or damaged, export it again") from None
        raise NotAnImageError(name, "not a DICOM file") from None
    if not has_preamble and "SOPClassUID" not in ds and not any(k in ds for k in PIXEL_KEYWORDS):
        raise NotAnImageError(name, "not a DICOM file")
    _fill_transfer_syntax(ds)
    return ds


def _syntax(ds: Dataset) -> str:
    meta = ds.file_meta if hasattr(ds, "file_meta") else None
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


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
    uid = UID(_syntax(ds))
    return uid.name if uid.is_valid else "unknown"


def photometric(ds: Dataset) -> str:
    """Photometric interpretation, upper case, stripped."""
    return (header.text(ds, "PhotometricInterpretation") or "MONOCHROME2").upper()


def check_image(ds: Dataset, name: str) -> tuple[int, int, int]:
    """Return ``(frames, rows, cols)`` or raise why the object is not a usable image."""
    sop = header.text(ds, "SOPClassUID") or str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise NotAnImageError(name, "DICOMDIR (media directory, no image)")
    if not any(k in ds for k in PIXEL_KEYWORDS):
        kind = UID(sop).name if sop and UID(sop).is_valid else "object"
        raise NotAnImageError(name, f"{kind} without pixel data (not an image)")
    try:
        rows, cols = header.integer(ds, "Rows", 0), header.integer(ds, "Columns", 0)
        frames = header.integer(ds, "NumberOfFrames", 1) or 1
        samples = header.integer(ds, "SamplesPerPixel", 1) or 1
    except Exception as exc:
        raise CorruptFileError(name, f"image header incomplete or invalid ({type(exc).__name__} in "
                               "Rows/Columns/NumberOfFrames/SamplesPerPixel)") from None
    if min(rows, cols, frames) < 1 or samples not in (1, 3) or rows * cols * frames * samples > MAX_SAMPLES:
        raise CorruptFileError(name, "implausible image geometry in Rows/Columns/NumberOfFrames/SamplesPerPixel")
    return frames, rows, cols


def raw_bytes(ds: Dataset, elem: object) -> bytes | memoryview | None:
    """The encoded value of a raw element of ``ds``: its bytes, or for a deferred element a
    view of the bytes :func:`parse` read (no copy), cut at the element's own length or at
    the end of the file if shorter. ``None`` for a converted or unreachable element."""
    if not isinstance(elem, RawDataElement):
        return None
    if elem.value is not None:
        return elem.value
    buffer = getattr(ds, "buffer", None)
    if elem.value_tell is None or not isinstance(buffer, io.BytesIO):
        return None
    return memoryview(buffer.getvalue())[elem.value_tell : elem.value_tell + elem.length]  # BytesIO shares them


@dataclass(frozen=True)
class Linear:
    """Grayscale pixels before conversion: ``stored * slope + intercept`` are the values
    :func:`read_pixels` returns (MONOCHROME1's negation folded into slope and intercept)."""

    stored: np.ndarray  # (frames, rows, cols), integer or float
    slope: float
    intercept: float

    def values(self) -> np.ndarray:
        """float32 modality values (MONOCHROME1 negated)."""
        out = self.stored.astype(np.float32)
        if self.slope != 1:
            out *= np.float32(self.slope)
        if self.intercept:
            out += np.float32(self.intercept)
        return out


@contextmanager
def _decoding(ds: Dataset, name: str) -> Iterator[None]:
    """Translate any failure of a decoder into a :class:`DicomReadError` with a reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except DicomReadError:
        raise
    except BaseException as exc:  # Rust decoders (pylibjpeg-rle) panic with a BaseException
        raise _decode_error(ds, name, exc) from None


Geometry = tuple[int, int, int]  # (frames, rows, cols), as :func:`check_image` returns it


def decode_linear(ds: Dataset, name: str, index: int | None = None, geometry: Geometry | None = None
                  ) -> Linear | None:
    """Grayscale pixels with a linear modality LUT, unconverted; ``None`` for colour images and
    Modality LUT Sequences (use :func:`decode`). ``index``: only that frame (0-based) is
    decoded, as a ``(1, rows, cols)`` array; ``None``: every frame. ``geometry``: the
    dataset's :func:`check_image` result when the caller already has it."""
    frames, rows, cols = geometry or check_image(ds, name)
    _check_index(index, frames, name)
    pi = photometric(ds)
    if pi not in ("MONOCHROME1", "MONOCHROME2") or "ModalityLUTSequence" in ds:
        return None
    with _decoding(ds, name):
        stored = _decoded(ds, index)
        slope = header.number(ds, "RescaleSlope", 1.0) or 1.0
        intercept = header.number(ds, "RescaleIntercept", 0.0) or 0.0
        sign = -1.0 if pi == "MONOCHROME1" else 1.0
        return Linear(stored.reshape(frames if index is None else 1, rows, cols), sign * slope, sign * intercept)


def _check_index(index: int | None, frames: int, name: str) -> None:
    if index is not None and not 0 <= index < frames:
        raise ValueError(f"{name}: frame index {index} outside the image's {frames} frames")


def _decoded(ds: Dataset, index: int | None) -> np.ndarray:
    """pydicom's decoders (its public ``pydicom.pixels.pixel_array``): every frame, or only frame
    ``index`` (a multi-frame JPEG decodes just that frame's fragments). Not ``ds.pixel_array``:
    that property calls the same function and then fingerprints the pixel attributes twice to
    cache the array on the dataset, which a single read never reuses (0.33 of 0.95 ms for a
    512x512 CT slice)."""
    return pixel_array(ds, index=index)


def decode(ds: Dataset, name: str, index: int | None = None, geometry: Geometry | None = None) -> np.ndarray:
    """Pixels as float32 ``(frames, rows, cols)``: modality units or luma (see module doc).
    ``index`` and ``geometry`` as for :func:`decode_linear`."""
    geometry = geometry or check_image(ds, name)
    linear = decode_linear(ds, name, index, geometry)
    if linear is not None:
        with _decoding(ds, name):
            return linear.values()
    frames, rows, cols = geometry
    pi = photometric(ds)
    with _decoding(ds, name):
        stored = _decoded(ds, index)
        if pi == "PALETTE COLOR":
            out = _palette_luma(stored, ds)
        elif pi.startswith("MONOCHROME"):
            out = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
            if pi == "MONOCHROME1":
                np.negative(out, out=out)
        else:
            out = stored.astype(np.float32, copy=False) @ LUMA
        return np.ascontiguousarray(out, dtype=np.float32).reshape(frames if index is None else 1, rows, cols)
    raise AssertionError("unreachable")  # pragma: no cover (the context manager re-raises)


def _palette_luma(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Luma of palette colour pixels: pydicom's palette applied to every possible stored
    value (at most 2^16), converted once, then looked up per pixel (1.4 ms instead of 6 ms
    for a 350x800 image by expanding each pixel to RGB; the same values)."""
    if stored.dtype.kind not in "ui" or stored.dtype.itemsize > 2:
        return apply_color_lut(stored, ds).astype(np.float32) @ LUMA
    info = np.iinfo(stored.dtype)
    table = apply_color_lut(np.arange(info.min, info.max + 1).astype(stored.dtype), ds).astype(np.float32) @ LUMA
    return table[stored.astype(np.intp) - info.min] if info.min else table[stored]


def _decode_error(ds: Dataset, name: str, exc: BaseException) -> Exception:
    """Why pydicom could not decode: no decoder for the syntax (pydicom's decoder registry says,
    with the packages it lacks), native pixel data shorter than the header says, or damage."""
    syntax = UID(_syntax(ds))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return UnsupportedImageError(name, f"pydicom has no pixel decoder for {syntax_name(ds)}")
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        return UnsupportedImageError(name, f"no decoder installed for {syntax_name(ds)} (install one of: {needs})")
    if not syntax.is_compressed and _native_too_short(ds):
        return CorruptFileError(name, "pixel data shorter than the header says (truncated file?); export it again")
    return CorruptFileError(name, f"pixel data cannot be decoded as {syntax_name(ds)} "
                            f"({type(exc).__name__}); export it again or uncompressed")


def _native_too_short(ds: Dataset) -> bool:
    try:
        frames, rows, cols = (header.integer(ds, k, d) or d for k, d in (("NumberOfFrames", 1), ("Rows", 0),
                                                                         ("Columns", 0)))
        bits = header.integer(ds, "BitsAllocated", 0)
        samples = header.integer(ds, "SamplesPerPixel", 1) or 1
        data = raw_bytes(ds, ds.get_item(PIXEL_DATA_TAG, keep_deferred=True))  # what the file holds
        held = len(data) if data is not None else len(ds.PixelData)
    except Exception:
        return False
    return held < frames * rows * cols * samples * bits // 8


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
