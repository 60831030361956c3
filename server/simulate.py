"""Many virtual sites on one machine through Flower's simulation runtime (Ray backend)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from client.audit_trail import site_key_path
from client.canaries import plant, planted
from client.config import DataConfig, PrivacyPolicy, SecAggPolicy, SiteConfig, load_site_config, write_site_config
from client.secagg_mod import roster_path
from client.site import load_site_data
from client.synth import generate_site, site_profile
from client.synth_radiograph import generate_radiograph_site, radiograph_profile
from privacy.errors import InputError
from privacy.files import atomic_write_bytes, atomic_write_json, private_dir
from privacy.keys import load_or_create_key, public_pem
from privacy.secagg.wire import roster_bytes
from server.audit_trail import SERVER_KEY
from server.chaos import Failure, Poison, failure_mods, flip_labels, scale_mod
from server.config import RunConfig
from server.rounds import RoundCallback
from server.rundir import private_keys_dir
from server.runtime import ray_init_args, runtime_environment
from server.stop import StopRequest

SITES_DIR = "sites"
KEYS_DIR = "keys"
ROSTER_FILE = "roster.json"
SIMULATION_FILE = "simulation.json"  # what --resume needs besides metrics.json: the sites, the roster's fingerprint


@dataclass(frozen=True)
class SimulationRecord:
    """How a simulation was set up, kept in ``RUN_DIR/simulation.json`` for ``--resume`` (no patient data)."""

    workspaces: tuple[str, ...]
    roster_fingerprint: str
    sites_dir: str = ""
    keys_dir: str = ""
    poisons: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()  # --fail SITE:ROUND:STAGE (kept so a resumed run keeps its plan)
    privacy_audit: str = ""  # the site whose attacks run at the end (simulate --privacy-audit)
    canary_site: str = ""  # the site whose canaries are audited ("" = privacy_audit's)

    def write(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / SIMULATION_FILE, asdict(self))

    @classmethod
    def read(cls, run_dir: Path) -> SimulationRecord:
        path = Path(run_dir) / SIMULATION_FILE
        if not path.is_file():
            raise SimulationRecordError(f"{path} is missing: only a run made by `medfed-server simulate` can be "
                                        "resumed with simulate --resume (a deployment: `medfed-server run --resume`)")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            strs = lambda key: tuple(str(v) for v in _list(doc.get(key, ())))  # noqa: E731
            return cls(workspaces=tuple(str(w) for w in _list(doc["workspaces"])),
                       roster_fingerprint=str(doc["roster_fingerprint"]),
                       sites_dir=str(doc.get("sites_dir", "")), keys_dir=str(doc.get("keys_dir", "")),
                       poisons=strs("poisons"), failures=strs("failures"),
                       privacy_audit=str(doc.get("privacy_audit", "")), canary_site=str(doc.get("canary_site", "")))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise SimulationRecordError(f"{path}: not JSON ({type(exc).__name__}); the file is damaged") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise SimulationRecordError(f"{path}: field {exc} is missing or malformed; the file was edited") from None


class SimulationRecordError(InputError, ValueError):
    """``RUN_DIR/simulation.json`` is missing, damaged or edited: the run cannot be resumed."""


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class SimulationPlan:
    """Where the virtual sites come from."""

    sites: int
    patients: int | None = None
    data: Sequence[Path] = ()
    sites_dir: Path | None = None
    data_seed: int = 0
    policy: PrivacyPolicy = PrivacyPolicy()
    kind: str = "ct"  # generated sites: "ct" (chest CT slices, one binary label) or "radiograph" (multi-label DX)
    difficulty: float = 1.0  # generated sites: higher = fainter findings
    poisons: tuple[Poison, ...] = ()  # chaos: poisoned virtual sites (server.chaos)
    failures: tuple[Failure, ...] = ()  # chaos: virtual sites killed at a round's stage (server.chaos)
    val_share: float | None = None  # each site's validation share (the attacks' non-members); None: the default
    reuse_privacy: tuple[tuple[str, Any], ...] = ()  # privacy fields given on the CLI: applied to --sites-dir too
    canaries: int = 0  # canary patients planted at ``canary_site`` for the one-run DP audit (client.canaries)
    audit_site: str = ""
    canary_site: str = ""  # "" = audit_site

    @property
    def canaries_at(self) -> str:
        return self.canary_site or self.audit_site

    def __post_init__(self) -> None:
        if self.kind not in GENERATED_KINDS:
            raise ValueError(f"--kind {self.kind!r}: use one of {', '.join(GENERATED_KINDS)}")
        names = {f"site-{i + 1}" for i in range(self.sites)}
        if any(p.site not in names for p in self.poisons):
            raise ValueError(f"--poison names a site that is not in this simulation ({', '.join(sorted(names))})")
        if any(f.site not in names for f in self.failures) and self.sites_dir is None:
            raise ValueError(f"--fail names a site that is not in this simulation ({', '.join(sorted(names))})")
        if any(p.flip_labels for p in self.poisons) and (self.data or self.sites_dir is not None):
            raise ValueError("--poison SITE:flip-labels works on generated sites only (not with --data or --sites-dir)")
        if self.val_share is not None and not 0 < self.val_share < 1:
            raise ValueError(f"--val-share {self.val_share}: give a share between 0 and 1 (e.g. 0.5)")
        if self.canaries and self.kind != "ct":
            raise ValueError("--privacy-audit plants binary CT canaries: use --kind ct (or --canaries 0)")
        for flag, site in (("--audit-site", self.audit_site), ("--canary-site", self.canary_site)):
            if site and site not in names and self.sites_dir is None:
                raise ValueError(f"{flag} {site!r} is not in this simulation ({', '.join(sorted(names))})")


GENERATED_KINDS = ("ct", "radiograph")


def _generate(folder: Path, plan: SimulationPlan, index: int) -> None:
    if plan.kind == "radiograph":
        generate_radiograph_site(folder, radiograph_profile(index, patients=plan.patients, difficulty=plan.difficulty),
                                 seed=plan.data_seed)
    else:
        generate_site(folder, site_profile(index, patients=plan.patients, difficulty=plan.difficulty),
                      seed=plan.data_seed)


def prepare_sites(out: Path, plan: SimulationPlan, image_size: int, private: Path | None = None,
                  findings: tuple[str, ...] = (), windows: tuple[tuple[float, float], ...] = ()) -> list[SiteConfig]:
    """Create (or reuse) one site workspace per virtual site and warm its data cache.

    Every private key (the server's audit key, each virtual site's identity key and identifier
    key) lives under ``private`` (default ``OUT.keys``), outside the run directory; the run
    directory gets the public keys and the roster. Fails early, before the runtime starts, with
    the site's own data error.
    """
    private = private_dir(Path(private) if private is not None else private_keys_dir(out))
    if plan.sites_dir is not None:
        workspaces = sorted(p for p in Path(plan.sites_dir).iterdir() if (p / "site.toml").is_file())
        if len(workspaces) < plan.sites:
            raise FileNotFoundError(
                f"{plan.sites_dir} holds {len(workspaces)} site workspace(s), {plan.sites} requested: "
                "point --sites-dir at OLD_RUN/sites or lower --sites"
            )
        configs = [load_site_config(w) for w in workspaces[: plan.sites]]
        if plan.reuse_privacy or plan.val_share is not None:  # the flags given apply to reused virtual sites too
            configs = [replace(c, privacy=replace(c.privacy, **dict(plan.reuse_privacy)),
                               data=replace(c.data, val_fraction=plan.val_share or c.data.val_fraction))
                       for c in configs]
            for config in configs:
                write_site_config(config)
    else:
        if plan.data and len(plan.data) != plan.sites:
            raise ValueError(f"--data was given {len(plan.data)} time(s) for {plan.sites} sites: give one folder per site")
        configs = []
        share = plan.val_share or DataConfig.val_fraction
        for i in range(plan.sites):
            name = f"site-{i + 1}"
            ws = (out / SITES_DIR / name).resolve()
            if plan.data:
                folder = Path(plan.data[i]).resolve()
                data = DataConfig(dicom=str(folder), labels=str(folder / "labels.csv"), findings=findings,
                                  val_fraction=share)
            else:  # a generated site offers the run's label columns
                data = DataConfig(findings=findings, val_fraction=share)
                if not (ws / data.labels).is_file():
                    _generate(ws / data.dicom, plan, i)
                if any(p.site == name and p.flip_labels for p in plan.poisons):
                    flipped = flip_labels(ws / data.labels, ws / "labels-flipped.csv")
                    data = DataConfig(findings=findings, labels=str(flipped), val_fraction=share)
            # a 2-site study is a researcher's choice: the virtual sites accept rounds of all the sites there are
            secagg = SecAggPolicy(min_sites=min(SecAggPolicy.min_sites, plan.sites),
                                  min_neighbours=min(SecAggPolicy.min_neighbours, plan.sites - 1)) \
                if plan.sites >= 2 else SecAggPolicy()
            config = SiteConfig(workspace=ws, name=name, device="auto", data=data, privacy=plan.policy, secagg=secagg,
                                keys=str((private / SITES_DIR / name).resolve()))
            write_site_config(config)
            configs.append(config)
    if plan.canaries:
        configs = [_with_canaries(c, plan.canaries) if c.name == plan.canaries_at else c for c in configs]
        missing = {plan.audit_site, plan.canaries_at} - {c.name for c in configs}
        if missing:
            raise ValueError(f"--audit-site/--canary-site {', '.join(sorted(missing))} not among the sites "
                             f"({', '.join(c.name for c in configs)})")
    for config in configs:
        load_site_data(config, image_size=image_size, progress=True, findings=findings, windows=windows)  # the cache
        # the site's identity/audit key, and its public half in the run's roster of keys
        key = load_or_create_key(site_key_path(config))
        atomic_write_bytes(out / KEYS_DIR / f"{config.name}.pub", public_pem(key.public_key()))
    server = load_or_create_key(private / SERVER_KEY)
    atomic_write_bytes(out / KEYS_DIR / "server.pub", public_pem(server.public_key()))
    # the federation roster the driver pins at every virtual site (deployments: `medfed-site roster`)
    roster = roster_bytes({c.name: (out / KEYS_DIR / f"{c.name}.pub").read_text() for c in configs},
                          public_pem(server.public_key()).decode())
    atomic_write_bytes(out / KEYS_DIR / ROSTER_FILE, roster)  # the server delivers it every round
    for config in configs:
        atomic_write_bytes(roster_path(config), roster)
    return configs


def _with_canaries(config: SiteConfig, m: int) -> SiteConfig:
    """The audited site with ``m`` canaries planted (kept when an earlier run planted them: their
    inclusion draw does not depend on this run, whose model starts afresh)."""
    found = planted(config)
    if found is not None and found.m == m and config.data.canaries:
        return config
    return plant(config, m)


def run_simulation_runtime(
    cfg: RunConfig, configs: Sequence[SiteConfig], *, on_round: RoundCallback | None = None,
    verbose: bool = False, poisons: Sequence[Poison] = (), stop: StopRequest | None = None, resume: bool = False,
    failures: Sequence[Failure] = (),
) -> dict[str, Any]:
    """Run the federation with Flower's simulation runtime, one Ray actor CPU per site.

    The environment the runtime and its Ray workers need (telemetry off; quiet unless
    ``verbose``) is set for the run only and restored after it."""
    env = runtime_environment(verbose)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    with scoped_environment(env):
        if not verbose:
            flwr_log.setLevel(logging.ERROR)
        try:
            return _run(cfg, configs, on_round, verbose, poisons, stop=stop, resume=resume, failures=failures)
        finally:
            flwr_log.setLevel(level)


@contextlib.contextmanager
def scoped_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set the variables of ``values`` that are not set already, for the block only."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _run(cfg: RunConfig, configs: Sequence[SiteConfig], on_round: RoundCallback | None, verbose: bool,
         poisons: Sequence[Poison] = (), *, stop: StopRequest | None = None, resume: bool = False,
         failures: Sequence[Failure] = ()) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from server.app import build_server_app

    result: dict[str, Any] = {}
    sites = [str(c.workspace) for c in configs]
    cpus = os.cpu_count() or 1

    def record(row: dict[str, Any]) -> None:
        result.setdefault("rounds", []).append(row)
        if on_round is not None:
            on_round(row)

    run_simulation(
        server_app=build_server_app(cfg, on_round=record, stop=stop, resume=resume),
        client_app=_client_app(sites, poisons, failures),
        num_supernodes=len(configs),
        backend_config={
            "client_resources": {"num_cpus": site_cpus(len(configs), cpus), "num_gpus": 0.0},
            "init_args": ray_init_args(verbose),  # unused where the child's warm start began Ray (server.runtime)
        },
        verbose_logging=verbose,
    )
    return result


def site_cpus(sites: int, cpus: int) -> float:
    """Ray CPUs per virtual site: a federation of up to twice the cores runs every site at once (each
    a share of the cores: with 3 sites on 2 cores, the third would otherwise wait for a free core
    while the other idles); a larger one runs one site per core, so memory stays bounded (one
    worker process per core). Rounded down so Flower's actor pool counts ``sites`` actors."""
    if sites <= 2 * cpus:
        return math.floor(1000 * cpus / sites) / 1000
    return 1.0


def _client_app(sites: Sequence[str], poisons: Sequence[Poison], failures: Sequence[Failure]) -> Any:
    """The ClientApp with the run's chaos mods (``server.chaos``), if any."""
    from client.app import build_client_app

    inner, outer = [scale_mod(poisons, sites)] if poisons else [], []
    if failures:
        kill_outer, kill_inner = failure_mods(failures, sites)
        inner, outer = [kill_inner, *inner], [kill_outer]
    return build_client_app(sites, inner_mods=inner, outer_mods=outer)
