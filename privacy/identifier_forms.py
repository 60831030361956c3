"""Numeric and textual forms of identifying values: the forms a site fingerprints of each
header value (:func:`header_forms`), and the canonical texts the egress guard derives from an
outgoing number (:func:`number_forms`) to compare with those fingerprints.

Both sides meet on canonical texts: a DICOM date is fingerprinted as ``YYYYMMDD`` and a
digit-string identifier also without its leading zeros; a number leaving the site is
turned back into every such text it could encode (its integer part, its rounding, its
absolute value, the neighbours of an integer, its digits without the decimal point, the
date it names as days or seconds since 1970-01-01 (a year or more away from it) or as a
fractional year, and the ASCII
text its 8 bytes spell). Forms shorter than :data:`MIN_FORM` characters are ignored on
both sides: they cannot single a patient out, and small counts and flags must pass.
"""

from __future__ import annotations

import datetime as dt
import math
import struct
from decimal import Decimal

MIN_FORM = 4  # shorter texts (a StudyID "1", a flag 1) are not compared
MIN_DIGITS = 6  # the digits of a non-integer without its decimal point: compared from this length
EPOCH = dt.date(1970, 1, 1)
_DAY_RANGE = 80_000  # about 219 years either side of 1970: every plausible date
# ...but not the year around 1970-01-01 itself: de-identified exports often carry that date as a
# placeholder, and every small metric (a loss of 0.4, a count of 24) would name it
_MIN_DAYS = 366
_PRINTABLE = range(0x20, 0x7F)


def header_forms(text: str, vr: str | None = None) -> set[str]:
    """The texts a site fingerprints for one header value of value representation ``vr``:
    the value itself, a digit string without leading zeros, the date of a DA or DT value,
    the time of a TM or DT value without its fraction, and each component of a person name."""
    text = text.strip()
    forms = {text}
    if vr == "DA" or vr == "DT":
        date = text.replace("-", "").replace(".", "")[:8]  # old ACR-NEMA dates: YYYY.MM.DD
        if date.isdigit() and len(date) == 8:
            forms.update(date_orders(date))
    if vr == "DT":
        forms.add(text.split(".")[0].split("+")[0].split("-")[0][:14])
        forms.add(text[8:].split(".")[0][:6])
    if vr == "TM":
        forms.add(text.replace(":", "").split(".")[0])
    if vr == "PN":
        forms.update(part.strip() for group in text.split("=") for part in group.split("^"))
    forms.update(f.lstrip("0") for f in list(forms) if f.isdigit() and f.lstrip("0"))
    return {f for f in forms if len(f) >= MIN_FORM}


def date_orders(date: str) -> set[str]:
    """A ``YYYYMMDD`` date in the orders people write it: YYYYMMDD, MMDDYYYY, DDMMYYYY, YYMMDD,
    MMDDYY, DDMMYY (a number carrying a birth date in any of them is caught)."""
    y, m, d = date[:4], date[4:6], date[6:8]
    return {y + m + d, m + d + y, d + m + y, y[2:] + m + d, m + d + y[2:], d + m + y[2:]}


def number_forms(value: float) -> set[str]:
    """Every canonical identifier text a finite number could stand for (see the module doc)."""
    v = float(value)
    if not math.isfinite(v):
        return set()
    forms: set[str] = {repr(value) if isinstance(value, int) else repr(v)}
    ints = {math.trunc(v), round(v), math.floor(v), math.ceil(v)}
    for n in list(ints):
        ints.update((n - 1, n + 1, abs(n), abs(n) - 1, abs(n) + 1))
    forms.update(str(n) for n in ints)
    digits = format(Decimal(repr(abs(v))), "f").replace(".", "").lstrip("0")
    # at least MIN_DIGITS: a quantised metric (4 significant digits) never names a short identifier
    forms.update(d for d in (digits, digits.rstrip("0")) if len(d) >= MIN_DIGITS)
    for n in {math.trunc(v), round(v)}:
        forms.update(_days(n))
    for secs in (v, v / 1000.0):  # seconds (or milliseconds) since 1970
        forms.update(_days(math.floor(secs / 86400.0)))
    forms.update(_fractional_year(v))
    forms.update(_byte_texts(v, value))
    return {f for f in forms if len(f) >= MIN_FORM}


def _days(n: int) -> set[str]:
    if not _MIN_DAYS <= abs(n) <= _DAY_RANGE:
        return set()
    return {(EPOCH + dt.timedelta(days=d)).strftime("%Y%m%d") for d in (n - 1, n, n + 1)}


def _fractional_year(v: float) -> set[str]:
    """1962.197 -> dates around day 72 of 1962 (the year fraction of 1962-03-14)."""
    if not 1800.0 <= v < 2200.0 or v.is_integer():
        return set()
    year = int(v)
    start = dt.date(year, 1, 1)
    length = (dt.date(year + 1, 1, 1) - start).days
    day = (v - year) * length
    return {(start + dt.timedelta(days=d)).strftime("%Y%m%d")
            for d in {math.floor(day) - 1, math.floor(day), math.ceil(day)} if 0 <= d < length}


def _byte_texts(v: float, value: float) -> set[str]:
    """The ASCII text of the number's 8 bytes (float64 or int64, either byte order), when
    every byte that is not NUL padding is printable."""
    blobs = [struct.pack("<d", v), struct.pack(">d", v)]
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        blobs += [struct.pack("<q", value), struct.pack(">q", value)]
    return {t for t in (_ascii(b) for b in blobs) if t}


def _ascii(blob: bytes) -> str:
    text = blob.strip(b"\0")
    if text and all(b in _PRINTABLE for b in text):
        return text.decode("ascii").strip()
    return ""

