"""Fast reads of the few header values the ingest needs, straight from pydicom's raw
elements. Converting an element with ``ds.Keyword`` costs ~35 µs in pydicom 3; a site
reads ~20 per file, more than decoding an uncompressed 512x512 image takes."""

from __future__ import annotations

import struct

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

_INT_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}
_TAGS: dict[str, int] = {}


def _tag(keyword: str) -> int:
    tag = _TAGS.get(keyword)
    if tag is None:
        found = tag_for_keyword(keyword)
        if found is None:
            raise KeyError(keyword)
        tag = _TAGS[keyword] = found
    return tag


def _raw(ds: Dataset, keyword: str) -> tuple[str, bytes, bool] | object | None:
    """``(VR, bytes, little_endian)`` of a raw element, the converted value, or ``None``."""
    tag = _tag(keyword)
    elem = ds.get_item(tag, keep_deferred=True)  # None when absent (one dictionary lookup)
    if elem is None:
        return None
    if isinstance(elem, DataElement):
        return elem.value  # already converted
    vr = elem.VR or dictionary_VR(tag)
    return (str(vr), bytes(elem.value or b""), bool(elem.is_little_endian))


def text(ds: Dataset, keyword: str) -> str:
    """First value of a string element, stripped ('' when absent)."""
    got = _raw(ds, keyword)
    if got is None:
        return ""
    if isinstance(got, tuple):
        return got[1].decode("latin-1").split("\\")[0].strip(" \x00")
    if isinstance(got, list | tuple) or (hasattr(got, "__iter__") and not isinstance(got, str | bytes)):
        got = next(iter(got), "")
    return str(got).strip()


def number(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    """First value of a numeric element (US/SS/UL/SL binary or IS/DS text)."""
    got = _raw(ds, keyword)
    if got is None:
        return default
    if isinstance(got, tuple):
        vr, data, little = got
        fmt = _INT_FORMATS.get(vr)
        if fmt is not None:
            size = struct.calcsize(fmt)
            if len(data) < size:
                raise ValueError(f"{keyword} is too short")
            return float(struct.unpack(("<" if little else ">") + fmt, data[:size])[0])
        value = data.decode("latin-1").split("\\")[0].strip(" \x00")
        return float(value) if value else default
    if hasattr(got, "__iter__") and not isinstance(got, str | bytes):
        got = next(iter(got), default)
    return default if got is None or got == "" else float(got)  # type: ignore[arg-type]


def integer(ds: Dataset, keyword: str, default: int) -> int:
    """:func:`number` as an int (must be integral)."""
    value = number(ds, keyword, None)
    if value is None:
        return default
    if value != int(value):
        raise ValueError(f"{keyword} must be an integer")
    return int(value)
