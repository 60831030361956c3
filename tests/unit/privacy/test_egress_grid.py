"""The metric grid (``privacy.quantise``) and the numeric forms of identifiers
(``privacy.identifier_forms``) the egress guard compares: pinned values."""

from __future__ import annotations

import datetime as dt
import struct

import pytest

from privacy import egress as K
from privacy.identifier_forms import header_forms, number_forms
from privacy.quantise import GRID, REFUSAL_CODES, OffGrid, quantise, significant


def test_reals_keep_four_significant_digits_rounded_the_safe_way() -> None:
    assert quantise(K.EPSILON, 1.23412) == 1.235  # ε rounded up: never understated
    assert quantise(K.DELTA, 1.0000001e-6) == 1.001e-6
    assert quantise(K.NOISE_MULTIPLIER, 1.99999) == 1.999  # σ rounded down
    assert quantise(K.VAL_AUROC, 0.876549) == 0.8765 and quantise(K.TRAIN_LOSS, 0.693147) == 0.6931
    assert quantise(K.EPSILON, 0.0) == 0.0 and quantise(K.VAL_AUROC, 1.0) == 1.0
    assert significant(3e-15) == 0.0 and significant(3e-15, "ROUND_CEILING") == 1e-12
    assert quantise(K.EPSILON, 999.99) == 1000.0  # rounded up, capped at the range's end


def test_a_quantised_value_cannot_carry_eight_arbitrary_bytes() -> None:
    spelled = struct.unpack("<d", b"DOE^JOHN")[0]
    with pytest.raises(OffGrid, match="outside"):
        quantise(K.TRAIN_LOSS, spelled)
    small = struct.unpack("<d", b"DOE^JO\x80\x3f")[0]  # bytes chosen to land in range
    q = quantise(K.VAL_LOSS, small)
    assert struct.pack("<d", q) != b"DOE^JO\x80\x3f" and q == float(f"{small:.4g}")


@pytest.mark.parametrize(("key", "value", "why"), [
    (K.NUM_EXAMPLES, 3.5, "not an integer"), (K.NUM_EXAMPLES, -1, "outside"), (K.PATIENTS, 10_000_001, "outside"),
    (K.REFUSED, 2, "outside"), (K.REFUSAL_CODE, 9, "outside"), (K.EPSILON, float("nan"), "not finite"),
    (K.EPSILON, -0.1, "outside"), (K.VAL_AUROC, 1.01, "outside"), (K.EPSILON, True, "not a number"),
    ("age", 42, "not whitelisted"),
])
def test_off_grid_values_are_refused_naming_the_key(key: str, value: float, why: str) -> None:
    with pytest.raises(OffGrid, match=why) as info:
        quantise(key, value)
    assert repr(value) not in str(info.value) or isinstance(value, bool)


def test_every_metric_has_a_grid_and_refusal_codes_are_the_sites() -> None:
    assert set(GRID) == K.ALL_METRICS
    codes = {v for k, v in vars(K).items() if k.startswith("REFUSED_") and isinstance(v, int)}
    assert codes == REFUSAL_CODES == {1, 2, 3, 4, 5, 6}
    assert quantise(K.NUM_EXAMPLES, 24.0) == 24 and isinstance(quantise(K.NUM_EXAMPLES, 24.0), int)


def test_header_forms_of_dates_times_names_and_digit_ids() -> None:
    # YYYYMMDD, MMDDYYYY, DDMMYYYY, YYMMDD, MMDDYY, DDMMYY (and without leading zeros)
    assert header_forms("19620314", "DA") == {"19620314", "03141962", "3141962", "14031962", "620314", "031462",
                                              "31462", "140362"}
    assert header_forms("1962.03.14", "DA") >= {"19620314"}
    assert header_forms("19620314083015.123+0100", "DT") >= {"19620314", "19620314083015", "083015", "83015"}
    assert header_forms("083015.5", "TM") >= {"083015", "83015"}
    assert header_forms("DOE^JOHN", "PN") == {"DOE^JOHN", "JOHN"}  # "DOE": under MIN_FORM
    assert header_forms("0004821397", "LO") == {"0004821397", "4821397"}
    assert header_forms("1", "SH") == set()  # a StudyID "1" would block every flag


BIRTH = "19620314"


@pytest.mark.parametrize("value", [19620314, 19620314.5, -19620314, 1962.0314, 196.20314, 0.19620314,
                                   19620313, 19620315.0, 1962 + 72 / 365])
def test_number_forms_recover_the_date(value: float) -> None:
    assert BIRTH in number_forms(value)


def test_number_forms_of_epoch_offsets_neighbours_and_bytes() -> None:
    days = (dt.date(1962, 3, 14) - dt.date(1970, 1, 1)).days
    assert days == -2850 and BIRTH in number_forms(days) and BIRTH in number_forms(days * 86400.0 + 7200)
    assert BIRTH in number_forms(days * 86_400_000.0)  # milliseconds
    assert {"4821396", "4821398"} <= number_forms(4821397) and "4821397" in number_forms(4821398)
    assert "DOE^JOHN" in number_forms(struct.unpack("<d", b"DOE^JOHN")[0])
    assert "DOE^JOHN" in number_forms(struct.unpack(">q", b"DOE^JOHN")[0])
    assert "JOHN" in number_forms(struct.unpack("<d", b"JOHN\0\0\0\0")[0])
    # honest small metrics name nothing: no epoch date within a year of 1970, no short digits
    assert number_forms(24) == set() and number_forms(0.4123) == {"0.4123"} and number_forms(1) == set()
