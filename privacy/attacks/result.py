"""The closed schema of an attack result: the only thing the attack path lets leave a site.

Numbers (finite floats, counts, a fixed-grid ROC curve), the site's name, the run id and the
attacked model's sha256. Anything else (an unknown key, a string where a number belongs, a
patient's value) is refused before the result is written or sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from privacy.attacks.roc import ROC_POINTS
from privacy.errors import InputError

KINDS = ("membership", "inversion", "canary")
SCHEMA = "medfed-attacks/1"

_SEPARATION = {"auroc": float, "tpr_at_1pct_fpr": float, "tpr_at_01pct_fpr": float, "members": int,
               "non_members": int, "roc_fpr": list, "roc_tpr": list}
_PLAIN = {"ssim": float, "psnr": float, "batch_size": int}
_SECTIONS: dict[str, dict[str, Any]] = {
    "utility": {"val_auroc": float, "val_loss": float},
    "membership": {"loss": _SEPARATION, "calibrated": _SEPARATION, "reference_models": int},
    "inversion": {"plain": _PLAIN, "dp": {**_PLAIN, "noise_multiplier": float, "max_grad_norm": float},
                  "aggregate": {**_PLAIN, "sites": int}, "iterations": int, "image_size": int,
                  "reference": {"ssim": float, "median_ssim": float, "images": int}},
    "canary": {"canaries": int, "included": int, "guesses": int, "correct": int, "epsilon_lower_bound": float,
               "confidence": float, "delta": float, "accountant_epsilon": (float, type(None)),
               "within_accountant": bool},
}
# fields a section may leave out (no reference models; no validation AUROC for one class; no other patients)
_OPTIONAL = frozenset({"calibrated", "reference_models", "val_auroc", "reference"})
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AttackResultError(InputError, ValueError):
    """An attack result does not fit the closed schema (it is not written, shown or sent)."""


def attack_result(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` checked against the schema, with the schema's name added; raises :class:`AttackResultError`."""
    out: dict[str, Any] = {"schema": SCHEMA}
    for key, value in doc.items():
        if key == "schema":
            if value != SCHEMA:
                raise AttackResultError(f"attack result: schema {value!r} is not {SCHEMA!r}")
        elif key in ("site", "run_id"):
            if not isinstance(value, str) or not _NAME.match(value):
                raise AttackResultError(f"attack result: {key} must be 1-64 letters, digits, '.', '_' or '-'")
            out[key] = value
        elif key == "model_sha256":
            if not isinstance(value, str) or not _HEX64.match(value):
                raise AttackResultError("attack result: model_sha256 must be 64 lowercase hex digits")
            out[key] = value
        elif key in _SECTIONS:
            out[key] = _check(value, _SECTIONS[key], key)
        else:
            raise AttackResultError(f"attack result: unknown field {key!r} (allowed: site, run_id, model_sha256, "
                                    f"{', '.join(_SECTIONS)})")
    return out


def _check(value: Any, spec: Any, where: str) -> Any:
    if isinstance(spec, dict):
        if not isinstance(value, Mapping):
            raise AttackResultError(f"attack result: {where} must be an object")
        unknown = set(value) - set(spec)
        if unknown:
            raise AttackResultError(f"attack result: unknown field(s) {sorted(unknown)} in {where}")
        checked = {k: _check(v, spec[k], f"{where}.{k}") for k, v in value.items()}
        missing = set(spec) - set(value) - _OPTIONAL
        if missing:
            raise AttackResultError(f"attack result: {where} lacks {sorted(missing)}")
        return checked
    if spec is list:
        if not isinstance(value, list | tuple) or len(value) != ROC_POINTS:
            raise AttackResultError(f"attack result: {where} must list {ROC_POINTS} numbers")
        return [_number(v, f"{where}[]") for v in value]
    kinds = spec if isinstance(spec, tuple) else (spec,)
    if value is None and type(None) in kinds:
        return None
    if bool in kinds:
        if not isinstance(value, bool):
            raise AttackResultError(f"attack result: {where} must be true or false")
        return value
    if int in kinds:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9:
            raise AttackResultError(f"attack result: {where} must be a count")
        return int(value)
    return _number(value, where)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise AttackResultError(f"attack result: {where} must be a finite number")
    return float(value)
