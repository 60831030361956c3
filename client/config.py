"""Site configuration (``site.toml`` in the site workspace) as frozen, validated dataclasses."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from client.dicom.preprocess import FRAME_POLICIES, Preprocessing
from privacy.files import atomic_write_bytes

SITE_FILE = "site.toml"


class SiteConfigError(ValueError):
    """``site.toml`` is missing or invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """What the site allows. It always wins over what the server asks for."""

    dp: bool = True
    max_epsilon: float = 8.0
    delta: float = 0.0  # 0 = automatic: 1 / (10 * patients)
    accountant: str = "rdp"
    max_noise_multiplier: float = 20.0
    max_grad_norm: float = 1.0
    require_secure_aggregation: bool = True  # refuse to send an update that is not masked

    def delta_for(self, patients: int) -> float:
        """The δ this site accounts with: the policy's, or automatic for its patient count."""
        from privacy.dp import auto_delta  # lazy: privacy.dp loads torch, site commands need not

        return self.delta or auto_delta(patients)

    def __post_init__(self) -> None:
        if self.max_epsilon <= 0:
            raise SiteConfigError("privacy.max_epsilon must be > 0 (e.g. 8.0)")
        if not 0 <= self.delta < 1:
            raise SiteConfigError("privacy.delta must be in [0, 1) (0 = automatic)")
        if self.accountant not in ("rdp", "prv"):
            raise SiteConfigError("privacy.accountant must be 'rdp' or 'prv'")
        if self.max_grad_norm <= 0 or self.max_noise_multiplier <= 0:
            raise SiteConfigError("privacy.max_grad_norm and max_noise_multiplier must be > 0")


@dataclass(frozen=True)
class DataConfig:
    """Where the site's DICOM export and labels are (relative paths: to the workspace)."""

    dicom: str = "data"
    labels: str = "data/labels.csv"
    allow_unlabelled: bool = False
    val_fraction: float = 0.2
    split_seed: int = 0
    frames: str = "middle"  # multi-frame objects: "middle", "all" (one sample per frame) or "reject"
    window: tuple[float, ...] = ()  # [center, width] overriding the files' VOI window; empty = theirs
    workers: int = 0  # decoding processes; 0 = one per CPU (at most 8)

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise SiteConfigError("data.val_fraction must be between 0 and 1 (e.g. 0.2)")
        if self.frames not in FRAME_POLICIES:
            raise SiteConfigError(f"data.frames must be one of {list(FRAME_POLICIES)} (got {self.frames!r})")
        object.__setattr__(self, "window", tuple(self.window))  # TOML gives a list
        if self.window and (len(self.window) != 2 or float(self.window[1]) <= 0):
            raise SiteConfigError("data.window must be [center, width] with width > 0, or [] for the files' own")
        if self.workers < 0:
            raise SiteConfigError("data.workers must be >= 0 (0 = one per CPU)")

    def preprocessing(self, image_size: int) -> Preprocessing:
        """The preprocessing this site's data gets for a model of ``image_size``."""
        window = (float(self.window[0]), float(self.window[1])) if self.window else None
        return Preprocessing(image_size=image_size, window=window, frames=self.frames)


@dataclass(frozen=True)
class SiteConfig:
    """A site workspace's configuration."""

    workspace: Path
    name: str
    device: str = "auto"
    server: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise SiteConfigError(
                f"site.name {self.name!r} must be non-empty letters, digits, '-', '_' or '.'"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise SiteConfigError("site.device must be 'auto', 'cpu' or 'cuda'")

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
    def cache_dir(self) -> Path:
        return self.workspace / "cache"

    @property
    def ledger_file(self) -> Path:
        return self.workspace / "ledger.json"

    def to_toml(self) -> dict[str, Any]:
        return {
            "site": {"name": self.name, "server": self.server, "device": self.device},
            "data": {**asdict(self.data), "window": list(self.data.window)},
            "privacy": asdict(self.privacy),
        }


def _section(doc: dict[str, Any], name: str, cls: type, path: Path) -> Any:
    raw = doc.get(name, {})
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise SiteConfigError(
            f"{path}: unknown key(s) {sorted(unknown)} in [{name}]; known keys: {sorted(known)}"
        )
    return cls(**raw)


def load_site_config(workspace: Path) -> SiteConfig:
    """Read and validate ``WORKSPACE/site.toml``."""
    workspace = Path(workspace).resolve()
    path = workspace / SITE_FILE
    if not path.is_file():
        raise SiteConfigError(
            f"{path} not found: create the workspace with `medfed-site init --workspace {workspace}`"
        )
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError(f"{path}: not valid TOML ({exc}); fix the file") from None
    site = doc.get("site", {})
    try:
        return SiteConfig(
            workspace=workspace,
            name=str(site.get("name", "")),
            device=str(site.get("device", "auto")),
            server=str(site.get("server", "")),
            data=_section(doc, "data", DataConfig, path),
            privacy=_section(doc, "privacy", PrivacyPolicy, path),
        )
    except TypeError as exc:
        raise SiteConfigError(f"{path}: {exc}; fix the value types") from None
    except SiteConfigError as exc:
        raise SiteConfigError(f"{path}: {exc}") from None


def write_site_config(config: SiteConfig) -> Path:
    """Write ``site.toml`` atomically into the config's workspace."""
    config.workspace.mkdir(parents=True, exist_ok=True)
    path = config.workspace / SITE_FILE
    atomic_write_bytes(path, tomli_w.dumps(config.to_toml()).encode())
    return path
