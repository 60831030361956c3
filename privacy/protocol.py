"""The round request the server sends to every site, typed once for both sides.

At the site a request is attacker input: it is parsed into this frozen dataclass, whose
ranges are checked before any value is used. No value in it is secret or a seed: the
site's randomness never comes from the server.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
from flwr.app import ConfigRecord

from privacy import egress as K
from privacy.errors import InputError

_KEYS = {
    "server_round": K.SERVER_ROUND, "run_id": K.RUN_ID, "num_rounds": K.NUM_ROUNDS,
    "local_steps": K.LOCAL_STEPS, "batch_size": K.BATCH_SIZE, "learning_rate": K.LEARNING_RATE,
    "image_size": K.IMAGE_SIZE, "dp": K.DP_ENABLED, "noise_multiplier": K.NOISE_MULTIPLIER_REQUEST,
    "model": K.MODEL, "findings": K.FINDINGS, "window": K.WINDOW,
    "optimizer": K.OPTIMIZER,
}
OPTIMIZERS = ("adam", "sgd")
RUN_ID_PATTERN = re.compile(r"^(?!\.+$)[A-Za-z0-9_.\-]{1,64}$")  # a run id; never "." or ".."
_MODEL = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")  # the site checks the name itself (client.model_names)
_FINDING = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,31}$")


MAX_CHANNELS = 4


def parse_windows(text: str) -> tuple[tuple[float, float], ...]:
    """The ``(center, width)`` windows of a ``window`` value: "" = none (each file's own), one
    ``center,width``, or up to MAX_CHANNELS separated by ``;`` (one input channel each);
    :class:`RoundRequestError` when malformed."""
    if not text.strip():
        return ()
    parts = text.split(";")
    if len(parts) > MAX_CHANNELS:
        raise RoundRequestError(f"{K.WINDOW!r} names {len(parts)} windows: at most {MAX_CHANNELS} (one channel each)")
    out = []
    for part in parts:
        try:
            center, width = (float(t) for t in part.split(","))
        except ValueError:
            raise RoundRequestError(f"{K.WINDOW!r} must be 'center,width' (e.g. '-600,1500'), several separated by "
                                    "';', or empty") from None
        if not (math.isfinite(center) and math.isfinite(width) and abs(center) <= 1e6 and 0 < width <= 1e6):
            raise RoundRequestError(f"{K.WINDOW!r}: center and width must be finite, width > 0, both within 1e6")
        out.append((center, width))
    return tuple(out)


def parse_window(text: str) -> tuple[float, float] | None:
    """The single window of a ``window`` value (None: none given, or several: see :func:`parse_windows`)."""
    windows = parse_windows(text)
    return windows[0] if len(windows) == 1 else None


def parse_findings(text: str) -> tuple[str, ...]:
    """The finding names of a ``findings`` value ("" = the binary task); :class:`RoundRequestError` when malformed."""
    names = tuple(t.strip() for t in text.split(",")) if text.strip() else ()
    if len(names) > K.MAX_FINDINGS or len(set(names)) != len(names) or not all(_FINDING.match(n) for n in names):
        raise RoundRequestError(f"{K.FINDINGS!r} must list at most {K.MAX_FINDINGS} distinct names (a letter, then up "
                                "to 31 letters, digits, '_' or '-'), separated by commas")
    return names


class RoundRequestError(InputError, ValueError):
    """The server's round configuration is missing a key, has a wrong type or is out of range."""


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks every site to do in one round."""

    server_round: int
    run_id: str
    num_rounds: int
    local_steps: int
    batch_size: int
    learning_rate: float
    image_size: int
    dp: bool
    noise_multiplier: float  # the minimum the server asks for; a site may use more
    model: str = "slicenet"
    findings: str = ""  # label columns of a multi-label task, in output order ("" = one binary 'label')
    window: str = ""  # "center,width" VOI window for this run ("" = each file's own); the site's own wins
    optimizer: str = "adam"  # the local optimizer: adam, or sgd (momentum 0.9)

    def __post_init__(self) -> None:
        checks = (
            (1 <= self.server_round <= 1_000_000, K.SERVER_ROUND, "1..1000000"),
            (RUN_ID_PATTERN.match(self.run_id) is not None, K.RUN_ID, "1-64 letters, digits, '.', '_' or '-'"),
            (1 <= self.num_rounds <= 1_000_000, K.NUM_ROUNDS, "1..1000000"),
            (1 <= self.local_steps <= 100_000, K.LOCAL_STEPS, "1..100000"),
            (1 <= self.batch_size <= 65_536, K.BATCH_SIZE, "1..65536"),
            (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 10, K.LEARNING_RATE, "(0, 10]"),
            (8 <= self.image_size <= 1024, K.IMAGE_SIZE, "8..1024"),
            (math.isfinite(self.noise_multiplier) and 0 <= self.noise_multiplier <= 1000,
             K.NOISE_MULTIPLIER_REQUEST, "[0, 1000]"),
            (_MODEL.match(self.model) is not None, K.MODEL, "a network name or package.module:function"),
            (self.optimizer in OPTIMIZERS, K.OPTIMIZER, " or ".join(OPTIMIZERS)),
        )
        for ok, key, allowed in checks:
            if not ok:
                raise RoundRequestError(f"round config {key!r} is out of range (allowed {allowed})")
        parse_findings(self.findings)
        parse_windows(self.window)

    @property
    def voi_windows(self) -> tuple[tuple[float, float], ...]:
        return parse_windows(self.window)

    @property
    def channels(self) -> int:
        """Input channels: one per window when several are given, else one."""
        return max(1, len(self.voi_windows))

    @property
    def finding_names(self) -> tuple[str, ...]:
        return parse_findings(self.findings)

    @property
    def outputs(self) -> int:
        """Logits the network has: one per finding, one for the binary task."""
        return max(1, len(self.finding_names))

    @property
    def rounds_left(self) -> int:
        """Rounds still planned, this one included (the site caps what it plans with)."""
        return max(1, self.num_rounds - self.server_round + 1)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({key: getattr(self, name) for name, key in _KEYS.items()})

    def digest(self, model_sha256: str) -> str:
        """SHA-256 of every field of this request and the global model's hash: what a secure round
        binds into its view, so that every site whose shares a site accepts trained the very same
        request on the very same model (a per-site learning rate of 1e-12 zeroed every other
        update of a round: the model-inconsistency attack, red-team review 2026-12-04)."""
        body = {name: getattr(self, name) for name in _KEYS}
        return hashlib.sha256(json.dumps({"request": body, "model": model_sha256}, sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundRequest:
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):
            key, kind = _KEYS[f.name], hints[f.name]
            if key not in record:
                raise RoundRequestError(f"round config lacks {key!r}: server and site versions differ")
            value = record[key]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise RoundRequestError(f"round config {key!r} is not a valid {kind.__name__}")
            values[f.name] = kind(value)
        return cls(**values)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def server_head(record: Mapping[str, object]) -> str:
    """The server's audit-log head a request carries ("" when absent or not 64 hex): the site
    logs it with the round, counter-signing the server's log up to that entry."""
    value = record.get(K.SERVER_HEAD)
    return value if isinstance(value, str) and _HEX64.match(value) else ""


ArraysT = typing.TypeVar("ArraysT", bound=Mapping[str, np.ndarray])
MAX_WEIGHT = 1e4  # no weight of a trained imaging network comes near this; a crafted model may


def checked_model(arrays: ArraysT) -> ArraysT:
    """The global model a site received, refused unless every value is finite and at most
    ``MAX_WEIGHT`` in magnitude (defence in depth: DP-SGD and the metered evaluation already
    handle non-finite values per sample)."""
    for name, a in arrays.items():
        if a.dtype.kind != "f" or not bool(np.isfinite(a).all()) or (a.size and float(np.abs(a).max()) > MAX_WEIGHT):
            raise RoundRequestError(f"model array {name!r} is not finite floating point within ±{MAX_WEIGHT:g}")
    return arrays
