"""One site's data and model, assembled from its workspace configuration."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.canaries import training_canaries
from client.config import SiteConfig, SiteConfigError
from client.dicom import Cohort, load_cohort, split_patients
from client.dicom.identifiers import KEY_FILE as IDENTIFIER_KEY
from client.dicom.ingest import candidate_files


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
    patients, after the real ones (``canaries=False``: the real patients only).

    Within one process the result is kept while nothing it was made from changed (every file's
    size, mtime and inode under the DICOM folder and the canaries folder, the identifier key, the
    labels file and site.toml: what the ingest cache itself checks), so the messages of a run do not
    read the cache again; any change loads afresh."""
    key = (str(config.workspace), image_size, tuple(findings), tuple(windows), canaries)
    stamp = _inputs_stamp(config)
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is not None and hit[0] == stamp:
            _MEMO.move_to_end(key)
            return hit[1]
    data = _load_site_data(config, image_size=image_size, progress=progress, findings=findings, windows=windows,
                           canaries=canaries)
    with _MEMO_LOCK:
        _MEMO[key] = (stamp, data)
        while len(_MEMO) > MEMO_SIZE or (len(_MEMO) > 1 and sum(_nbytes(d) for _, d in _MEMO.values()) > MEMO_BYTES):
            _MEMO.popitem(last=False)
    return data


def _nbytes(data: SiteData) -> int:
    return sum(c.images.nbytes + c.labels.nbytes + c.patient.nbytes for c in (data.train, data.val))


MEMO_SIZE = 4  # cohorts kept per process (a simulation's actor serves every virtual site in turn)
MEMO_BYTES = 1 << 30  # and at most 1 GiB of them (large images: fewer)
_MEMO: OrderedDict[tuple[Any, ...], tuple[tuple[Any, ...], SiteData]] = OrderedDict()
_MEMO_LOCK = threading.Lock()


def _inputs_stamp(config: SiteConfig) -> tuple[Any, ...]:
    def tree(folder: Path) -> tuple[Any, ...]:
        if not folder.is_dir():
            return ()
        return tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino)
                     for rel, st in candidate_files(folder, exclude=(config.cache_dir,)))

    def one(path: Path) -> tuple[Any, ...]:
        try:
            st = os.stat(path)
        except OSError:
            return ()
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    canaries = tree(config.path(config.data.canaries)) if config.data.canaries else ()
    # the identifier key keys the label join; the fingerprint set beside it is an output of the ingest
    return (tree(config.dicom_dir), one(config.keys_dir / IDENTIFIER_KEY), canaries, one(config.labels_file),
            one(config.workspace / "site.toml"))


def _load_site_data(config: SiteConfig, *, image_size: int, progress: bool, findings: tuple[str, ...],
                    windows: tuple[tuple[float, float], ...], canaries: bool) -> SiteData:
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
