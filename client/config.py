"""Site configuration (``site.toml`` in the site workspace) as frozen, validated dataclasses."""

from __future__ import annotations

import math
import re
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from client.dicom.preprocess import FRAME_POLICIES, Preprocessing
from client.model_names import BUILTIN, FACTORY, MIN_IMAGE_SIZE
from privacy.errors import InputError
from privacy.files import atomic_write_bytes, private_dir
from privacy.secagg.params import SecAggFloors

SITE_FILE = "site.toml"
_FINDING = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,31}$")


class SiteConfigError(InputError, ValueError):
    """``site.toml`` is missing or invalid; the message names the field and the fix."""


METRIC_RELEASES = ("dp", "exact", "none")


def _in_range(name: str, value: float, lo: float, hi: float, *, open_low: bool = False) -> None:
    """Refuse a non-finite or out-of-range number, naming the field, the value and the range."""
    ok = math.isfinite(value) and (lo < value if open_low else lo <= value) and value <= hi
    if not ok:
        low = "(" if open_low else "["
        raise SiteConfigError(f"{name} = {value!r}: must be a finite number in {low}{lo:g}, {hi:g}]")


@dataclass(frozen=True)
class PrivacyPolicy:
    """What the site allows. It always wins over what the server asks for.

    The per-round and per-run caps bound what any one request can make the site spend:
    whatever number of rounds a request claims, a round's ε increment (its training plus
    its metered evaluation) never exceeds ``max_epsilon_per_round``.
    """

    dp: bool = True
    max_epsilon: float = 8.0
    delta: float = 0.0  # 0 = automatic: below 1 / (10 * patients)
    accountant: str = "rdp"
    max_epsilon_per_round: float = 4.0  # ε increment one round may cost, whatever the request says
    max_rounds_per_run: int = 100  # rounds of one run the site trains (and plans its noise over) at most
    min_noise_multiplier: float = 0.0  # a floor on σ beyond what the budget needs
    max_noise_multiplier: float = 20.0  # never train on more noise than this (the round is refused)
    max_grad_norm: float = 1.0
    require_secure_aggregation: bool = True  # refuse to send an update that is not masked
    metrics: str = "dp"  # validation metrics: "dp" (noisy, charged), "exact" (unmetered: synthetic data only), "none"
    eval_noise_multiplier: float = 10.0  # σ of a metered evaluation release (sensitivity 1 per patient)
    secure_noise: bool = False  # Opacus' secure_mode noise sampling (robust to floating-point attacks)
    seed: int | None = None  # site-local seed: deterministic noise for tests and research (warned, audited)

    def delta_for(self, patients: int) -> float:
        """The δ this site accounts with: the policy's, or automatic for its patient count."""
        from privacy.dp import auto_delta  # lazy: privacy.dp loads torch, site commands need not

        return self.delta or auto_delta(patients)

    def __post_init__(self) -> None:
        _in_range("privacy.max_epsilon", self.max_epsilon, 0, 100, open_low=True)
        if self.delta != 0:
            _in_range("privacy.delta (0 = automatic)", self.delta, 0, 1e-3, open_low=True)
        if self.accountant not in ("rdp", "prv"):
            raise SiteConfigError(f"privacy.accountant = {self.accountant!r}: must be 'rdp' or 'prv'")
        _in_range("privacy.max_epsilon_per_round", self.max_epsilon_per_round, 0, 100, open_low=True)
        _in_range("privacy.max_rounds_per_run", self.max_rounds_per_run, 1, 100_000)
        _in_range("privacy.max_noise_multiplier", self.max_noise_multiplier, 0, 1000, open_low=True)
        _in_range("privacy.min_noise_multiplier", self.min_noise_multiplier, 0, self.max_noise_multiplier)
        _in_range("privacy.max_grad_norm", self.max_grad_norm, 0, 1000, open_low=True)
        _in_range("privacy.eval_noise_multiplier", self.eval_noise_multiplier, 0.5, 1000)
        if self.metrics not in METRIC_RELEASES:
            raise SiteConfigError(f"privacy.metrics = {self.metrics!r}: must be one of {list(METRIC_RELEASES)}")
        if self.seed is not None:
            _in_range("privacy.seed", self.seed, 0, 2**63 - 1)


@dataclass(frozen=True)
class SecAggPolicy:
    """What this site accepts of a secure-aggregation round (``[secagg]``), whatever the server asks."""

    min_sites: int = 3  # distinct roster sites in a round (a victim and one sybil is no crowd)
    min_neighbours: int = 2  # neighbours that hold this site's shares
    assumed_colluders: int = 0  # sites that may side with the server: threshold > (holders + colluders) / 2
    update_bound: float = 1.0  # the round must not clip update values up to this magnitude
    max_abandoned_reveals: int = 8  # sparse graphs (> 64 sites): of the last 64 reveals, those never followed by input

    def __post_init__(self) -> None:
        _in_range("secagg.min_sites", self.min_sites, 2, 100_000)
        _in_range("secagg.min_neighbours", self.min_neighbours, 1, 100_000)
        _in_range("secagg.assumed_colluders", self.assumed_colluders, 0, 100_000)
        _in_range("secagg.update_bound", self.update_bound, 0, 1e6, open_low=True)
        _in_range("secagg.max_abandoned_reveals", self.max_abandoned_reveals, 0, 100_000)
        if self.min_sites < self.assumed_colluders + 2:
            raise SiteConfigError(f"site.toml [secagg]: min_sites = {self.min_sites} with assumed_colluders = "
                                  f"{self.assumed_colluders}: a round of that many sites could be this site and "
                                  "colluders only, whose sum is this site's update; set min_sites to at least "
                                  f"{self.assumed_colluders + 2}")

    def floors(self) -> SecAggFloors:
        return SecAggFloors(min_sites=self.min_sites, min_neighbours=self.min_neighbours,
                            assumed_colluders=self.assumed_colluders, update_bound=self.update_bound,
                            max_abandoned_reveals=self.max_abandoned_reveals)


@dataclass(frozen=True)
class ModelPolicy:
    """Which networks this site trains (``[models]``): built-in names, and factories it installed and reviewed."""

    allowed: tuple[str, ...] = BUILTIN  # built-in networks this site trains
    factories: tuple[str, ...] = ()  # "package.module:function" of installed packages (never the server's bundle)
    max_image_size: int = 512  # larger inputs are refused (memory and time at this site)
    max_batch_size: int = 512  # larger batches are refused (a request must not exhaust this site's memory)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed", tuple(self.allowed))  # TOML gives lists
        object.__setattr__(self, "factories", tuple(self.factories))
        unknown = [n for n in self.allowed if n not in BUILTIN]
        if unknown:
            raise SiteConfigError(f"models.allowed lists {unknown}: the built-in networks are {list(BUILTIN)} "
                                  "(installed factories go in models.factories)")
        for name in self.factories:
            if not FACTORY.match(name):
                raise SiteConfigError(f"models.factories entry {name!r} is not 'package.module:function'")
        _in_range("models.max_image_size", self.max_image_size, 8, 1024)
        _in_range("models.max_batch_size", self.max_batch_size, 1, 65_536)

    def refusal(self, model: str, image_size: int, batch_size: int = 1) -> str | None:
        """Why this site does not train ``model`` at ``image_size`` in batches of ``batch_size`` (None: it does)."""
        if model not in self.allowed and model not in self.factories:
            return (f"model {model[:200]!r} is not in [models] allowed or factories of this site's site.toml")
        if image_size > self.max_image_size:
            return f"image size {image_size} exceeds [models] max_image_size = {self.max_image_size}"
        if image_size < MIN_IMAGE_SIZE.get(model, 8):
            return f"model {model!r} needs inputs of at least {MIN_IMAGE_SIZE[model]} px (the run asks for {image_size})"
        if batch_size > self.max_batch_size:
            return f"batch size {batch_size} exceeds [models] max_batch_size = {self.max_batch_size}"
        return None


@dataclass(frozen=True)
class RobustnessPolicy:
    """``[robustness]``: the L2 bound this site puts on its own update before it is masked (0 = none)."""

    max_update_norm: float = 0.0

    def __post_init__(self) -> None:
        _in_range("robustness.max_update_norm (0 = no bound)", self.max_update_norm, 0, 1e6)


@dataclass(frozen=True)
class DataConfig:
    """Where the site's DICOM export and labels are (relative paths: to the workspace)."""

    dicom: str = "data"
    labels: str = "data/labels.csv"
    allow_unlabelled: bool = False
    findings: tuple[str, ...] = ()  # the 0/1 columns of the labels CSV this site offers to multi-label runs
    val_fraction: float = 0.2
    split_seed: int = 0
    frames: str = "middle"  # multi-frame objects: "middle", "all" (one sample per frame) or "reject"
    window: tuple[float, ...] = ()  # [center, width] overriding the files' VOI window; empty = theirs
    workers: int = 0  # decoding processes; 0 = one per CPU (at most 8)
    canaries: str = ""  # a DP audit's planted canary patients (client.canaries), always trained on; "" = none

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise SiteConfigError("data.val_fraction must be between 0 and 1 (e.g. 0.2)")
        if self.frames not in FRAME_POLICIES:
            raise SiteConfigError(f"data.frames must be one of {list(FRAME_POLICIES)} (got {self.frames!r})")
        object.__setattr__(self, "window", tuple(self.window))  # TOML gives a list
        object.__setattr__(self, "findings", tuple(self.findings))
        if len(set(self.findings)) != len(self.findings) or not all(_FINDING.match(f) for f in self.findings):
            raise SiteConfigError("data.findings must list distinct column names (a letter, then letters, digits, "
                                  "'_' or '-')")
        if self.window and (len(self.window) != 2 or not all(math.isfinite(float(v)) for v in self.window)
                            or float(self.window[1]) <= 0):
            raise SiteConfigError("data.window must be [center, width] with width > 0, or [] for the files' own")
        if self.workers < 0:
            raise SiteConfigError("data.workers must be >= 0 (0 = one per CPU)")

    def preprocessing(self, image_size: int, run_window: tuple[float, float] | None = None) -> Preprocessing:
        """The preprocessing this site's data gets for a model of ``image_size``: the run's window
        when it names one (the task's: a lung window for nodules), else the site's own (for files
        whose VOI window is wrong or missing), else each file's VOI window."""
        own = (float(self.window[0]), float(self.window[1])) if self.window else None
        window = run_window or own
        return Preprocessing(image_size=image_size, window=window, frames=self.frames)


@dataclass(frozen=True)
class SiteConfig:
    """A site workspace's configuration."""

    workspace: Path
    name: str
    device: str = "auto"
    server: str = ""
    keys: str = "keys"  # the site's secrets (audit/identity key, identifier key, fingerprints); relative: to the workspace
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    secagg: SecAggPolicy = field(default_factory=SecAggPolicy)
    models: ModelPolicy = field(default_factory=ModelPolicy)
    robustness: RobustnessPolicy = field(default_factory=RobustnessPolicy)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise SiteConfigError(
                f"site.name {self.name!r} must be non-empty letters, digits, '-', '_' or '.'"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise SiteConfigError("site.device must be 'auto', 'cpu' or 'cuda'")

    def task_refusal(self, model: str, image_size: int, findings: tuple[str, ...], batch_size: int = 1) -> str | None:
        """Why this site does not train this network on this task (None: it does). The label columns
        are the site's to offer: a run may train only on those listed in ``[data] findings``."""
        if findings and not set(findings) <= set(self.data.findings):
            missing = len(set(findings) - set(self.data.findings))
            return (f"the run asks for {missing} label column(s) this site does not offer for training: list the "
                    f"columns it may train on in [data] findings of {self.workspace / SITE_FILE}")
        return self.models.refusal(model, image_size, batch_size)

    def path(self, rel: str) -> Path:
        """Resolve a workspace-relative path."""
        p = Path(rel)
        return p if p.is_absolute() else self.workspace / p

    @property
    def dicom_dir(self) -> Path:
        return self.path(self.data.dicom)

    @property
    def labels_file(self) -> Path:
        return self.path(self.data.labels)

    @property
    def keys_dir(self) -> Path:
        """The site's secrets: its Ed25519 audit/identity key and the identifier key and
        fingerprints of the egress guard (0700; a simulation keeps them outside the run directory)."""
        return self.path(self.keys)

    @property
    def cache_dir(self) -> Path:
        return self.workspace / "cache"

    @property
    def ledger_file(self) -> Path:
        return self.workspace / "ledger.json"

    def to_toml(self) -> dict[str, Any]:
        return {
            "site": {"name": self.name, "server": self.server, "device": self.device, "keys": self.keys},
            "data": {**asdict(self.data), "window": list(self.data.window), "findings": list(self.data.findings)},
            "privacy": {k: v for k, v in asdict(self.privacy).items() if v is not None},  # TOML has no null
            "secagg": asdict(self.secagg),
            "robustness": asdict(self.robustness),
            "models": {**asdict(self.models), "allowed": list(self.models.allowed),
                       "factories": list(self.models.factories)},
        }


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a field's type hint (an int is a float; a bool is neither)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, list | tuple) and all(_type_ok(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _section(doc: dict[str, Any], name: str, cls: type) -> Any:
    raw = doc.get(name, {})
    if not isinstance(raw, dict):
        raise SiteConfigError(f"[{name}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise SiteConfigError(f"unknown key(s) {sorted(unknown)} in [{name}]; known keys: {sorted(known)}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if not _type_ok(value, hint):
            expected = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise SiteConfigError(f"{name}.{key} = {value!r} has the wrong type: expected {expected}")
        values[key] = float(value) if hint is float else value
    return cls(**values)


def load_site_config(workspace: Path) -> SiteConfig:
    """Read and validate ``WORKSPACE/site.toml``."""
    workspace = Path(workspace).resolve()
    path = workspace / SITE_FILE
    if not path.is_file():
        raise SiteConfigError(
            f"{path} not found: create the workspace with `medfed-site init --workspace {workspace}`"
        )
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SiteConfigError(f"{path}: not UTF-8 text (the file is damaged); restore it or run "
                              "`medfed-site init` again") from None
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError(f"{path}: not valid TOML ({exc}); fix the file") from None
    site = doc.get("site", {})
    try:
        return SiteConfig(
            workspace=workspace,
            name=str(site.get("name", "")),
            device=str(site.get("device", "auto")),
            server=str(site.get("server", "")),
            keys=str(site.get("keys", "keys")),
            data=_section(doc, "data", DataConfig),
            privacy=_section(doc, "privacy", PrivacyPolicy),
            secagg=_section(doc, "secagg", SecAggPolicy),
            models=_section(doc, "models", ModelPolicy),
            robustness=_section(doc, "robustness", RobustnessPolicy),
        )
    except TypeError as exc:
        raise SiteConfigError(f"{path}: {exc}; fix the value types") from None
    except SiteConfigError as exc:
        raise SiteConfigError(f"{path}: {exc}") from None


def write_site_config(config: SiteConfig) -> Path:
    """Write ``site.toml`` atomically into the config's workspace."""
    private_dir(config.workspace)
    path = config.workspace / SITE_FILE
    atomic_write_bytes(path, tomli_w.dumps(config.to_toml()).encode())
    return path
