"""Run configuration: ``[tool.flwr.app.config]`` / CLI flags -> one frozen, validated object."""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any

from client.model_names import ModelNameError, check_name
from privacy.errors import InputError
from privacy.protocol import OPTIMIZERS, RoundRequestError, parse_findings, parse_windows
from server.robust import AGGREGATORS

RESUME_KEY = "resume"  # run-config key of a deployed run: continue the run in run-dir (medfed-server run --resume)


class RunConfigError(InputError, ValueError):
    """A run configuration value is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    """Everything the server needs to drive one training run."""

    num_server_rounds: int = 3
    local_steps: int = 50
    batch_size: int = 64
    learning_rate: float = 2e-3
    image_size: int = 64
    model: str = "slicenet"  # a built-in network (client.model_names) or an installed factory package.module:function
    findings: str = ""  # multi-label: the labels.csv columns, comma-separated ("" = one binary 'label' column)
    window: str = ""  # "center,width": the run's VOI window (e.g. CT lung "-600,1500"); "" = each file's own
    init_weights: str = ""  # start from these local weights (.npz or .safetensors; sha256 in the audit log)
    optimizer: str = "adam"  # the sites' local optimizer: adam, or sgd (momentum 0.9)
    aggregator: str = "mean"  # mean | median | trimmed-mean | krum (the last three need every update: no SecAgg)
    update_norm_bound: float = 0.0  # L2 bound on a site's update: clipped (in the clear) / aggregate checked (SecAgg)
    min_sites: int = 1
    round_timeout: float = 600.0
    run_dir: str = ""
    seed: int = 0  # seeds the initial global model only; sites never receive it (their randomness is their own)
    dp: bool = True
    noise_multiplier: float = 0.0  # the minimum the server asks for; sites may use more
    secure_aggregation: bool = True  # SecAgg+: the server learns only the weighted mean update
    secagg_k: int = 0  # neighbourhood size (odd, self included); 0 = default (complete graph up to 64 sites)
    secagg_threshold: int = 0  # Shamir threshold; 0 = a strict majority of each site's share holders (sites' floor)
    secagg_colluders: int = 0  # colluding sites the rounds are sized for; a site assuming more refuses the round
    audit_key: str = ""  # the server's Ed25519 audit key; "" = RUN_DIR.keys/server.key (created; outside the run dir)
    roster_file: str = ""  # {"sites": {name: Ed25519 PEM}}: the enrolled identity keys, delivered to every site

    def __post_init__(self) -> None:
        checks = [
            (self.num_server_rounds >= 1, "num-server-rounds must be >= 1"),
            (self.local_steps >= 1, "local-steps must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.learning_rate > 0, "learning-rate must be > 0"),
            (8 <= self.image_size <= 1024, "image-size must be between 8 and 1024"),
            (self.min_sites >= 1, "min-sites must be >= 1"),
            (self.round_timeout > 0, "round-timeout must be > 0 seconds"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.aggregator in AGGREGATORS, f"aggregator must be one of {', '.join(AGGREGATORS)}"),
            (not (self.secure_aggregation and self.aggregator != "mean"),
             f"aggregator {self.aggregator!r} needs every site's update in the clear; secure aggregation shows the "
             "server only their mean: use aggregator 'mean' (with update-norm-bound) or turn secure aggregation off"),
            (math.isfinite(self.update_norm_bound) and self.update_norm_bound >= 0,
             "update-norm-bound must be a finite number >= 0 (0 = no bound)"),
        ]
        try:
            check_name(self.model)
            parse_findings(self.findings)
            if len(parse_windows(self.window)) > 1 and self.model == "slicenet":
                raise RunConfigError("run config: several windows (one channel each) need a MONAI network or a "
                                     "factory: slicenet takes one channel")
        except (ModelNameError, RoundRequestError) as exc:
            raise RunConfigError(f"run config: {exc}") from None
        for ok, message in checks:
            if not ok:
                raise RunConfigError(f"run config: {message}")

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any], **overrides: Any) -> RunConfig:
        """Build from Flower's ``context.run_config`` (hyphenated keys); unknown keys are errors."""
        names = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        hints = typing.get_type_hints(cls)  # the real types, not the annotation strings
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in names:
                raise RunConfigError(f"run config: unknown key {key!r}; known: {sorted(names)}")
            values[names[key]] = _coerce(hints[names[key]], key, value)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TRUE, _FALSE = frozenset({"1", "true", "yes"}), frozenset({"0", "false", "no"})


def pop_resume(run_config: dict[str, Any]) -> bool:
    """Take the ``resume`` instruction out of a deployed run's run-config (it is not run config)."""
    return bool(_coerce(bool, RESUME_KEY, run_config.pop(RESUME_KEY, False)))


def _coerce(kind: type, key: str, value: Any) -> Any:
    """``value`` (TOML or ``--run-config`` text) as the field's type; anything else is an error naming the key."""
    try:
        if kind is str:
            return str(value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise ValueError(text)
        if isinstance(value, bool):  # True is not the number 1 here
            raise TypeError(key)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(key)
        return kind(value)
    except (ValueError, TypeError):
        expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, kind.__name__)
        raise RunConfigError(f"run config: {key}={value!r} is not a valid {kind.__name__}; give {expected}") from None
