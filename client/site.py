"""One site's data and model, assembled from its workspace configuration."""

from __future__ import annotations

from dataclasses import dataclass

from client.canaries import training_canaries
from client.config import SiteConfig, SiteConfigError
from client.dicom import Cohort, load_cohort, split_patients


@dataclass(frozen=True)
class SiteData:
    """The site's training and validation patients (disjoint)."""

    train: Cohort
    val: Cohort
    canaries: int = 0  # planted canary patients at the end of ``train`` (``[data] canaries``)


def load_site_data(config: SiteConfig, *, image_size: int, progress: bool = False,
                   findings: tuple[str, ...] = (), windows: tuple[tuple[float, float], ...] = (),
                   canaries: bool = True) -> SiteData:
    """Load (from the workspace cache when possible) and split the site's cohort by patient;
    ``findings``: the label columns of a multi-label run (empty: the binary ``label``); ``windows``:
    the run's VOI window, or several (one input channel each); none: the site's ``[data] window``,
    else each file's own. A DP audit's planted canaries (``[data] canaries``) join the training
    patients, after the real ones (``canaries=False``: the real patients only)."""
    cohort = load_cohort(
        config.dicom_dir, config.labels_file, config.data.preprocessing(image_size, windows[0] if len(windows) == 1 else None),
        cache_dir=config.cache_dir, keys_dir=config.keys_dir,
        allow_unlabelled=config.data.allow_unlabelled,
        workers=config.data.workers, progress=progress, findings=findings,
        channels=windows if len(windows) > 1 else (),
    )
    train, val = split_patients(cohort, val_fraction=config.data.val_fraction,
                                seed=config.data.split_seed)
    if canaries and config.data.canaries:
        if findings or len(windows) > 1:
            raise SiteConfigError(f"[data] canaries in {config.workspace / 'site.toml'}: canaries are binary, "
                                  "one-channel CT slices; this run is multi-label or multi-window: remove them")
        planted = training_canaries(config, image_size, windows[0] if windows else None)
        if planted is not None:
            return SiteData(train=train.joined(planted), val=val, canaries=planted.n_patients)
    return SiteData(train=train, val=val)
