"""One site's data and model, assembled from its workspace configuration."""

from __future__ import annotations

from dataclasses import dataclass

from client.config import SiteConfig
from client.dicom import Cohort, load_cohort, split_patients


@dataclass(frozen=True)
class SiteData:
    """The site's training and validation patients (disjoint)."""

    train: Cohort
    val: Cohort


def load_site_data(config: SiteConfig, *, image_size: int, progress: bool = False,
                   findings: tuple[str, ...] = (), window: tuple[float, float] | None = None) -> SiteData:
    """Load (from the workspace cache when possible) and split the site's cohort by patient;
    ``findings``: the label columns of a multi-label run (empty: the binary ``label``); ``window``:
    the run's VOI window (the site's own ``[data] window`` wins)."""
    cohort = load_cohort(
        config.dicom_dir, config.labels_file, config.data.preprocessing(image_size, window),
        cache_dir=config.cache_dir, keys_dir=config.keys_dir,
        allow_unlabelled=config.data.allow_unlabelled,
        workers=config.data.workers, progress=progress, findings=findings,
    )
    train, val = split_patients(cohort, val_fraction=config.data.val_fraction,
                                seed=config.data.split_seed)
    return SiteData(train=train, val=val)
