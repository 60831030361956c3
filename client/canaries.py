"""Canary patients for the one-run DP audit (``privacy.attacks.canary``): planted at a site,
each in its training set with probability 1/2, scored after the run.

A canary is a synthetic, marked patient (PatientID ``CANARY-…``, de-identification method
"medfed canary"): one generated chest CT slice carrying the WRONG label (a nodule labelled 0 or
none labelled 1), a hard example a non-private model memorises. The included ones are DICOM
files under ``WORKSPACE/audit/canaries/in`` (``[data] canaries`` in site.toml makes training add
them to the training patients, never to validation); the excluded ones under ``out``; which is
which is the audit's secret and stays in the workspace.
"""

from __future__ import annotations

import csv
import io
import json
import secrets
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from client.config import SiteConfig, write_site_config
from client.dicom import Cohort, load_cohort
from client.synth import ct_dataset, render_slice, site_profile
from privacy.attacks.canary import draw_inclusion
from privacy.files import atomic_write_bytes, atomic_write_json, private_dir

CANARY_DIR = "audit/canaries"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Canaries:
    """The planted canaries of a site: their count and the (secret) inclusion of each, by number."""

    folder: Path
    included: np.ndarray

    @property
    def m(self) -> int:
        return len(self.included)


def plant(config: SiteConfig, m: int, *, seed: int | None = None) -> SiteConfig:
    """Write ``m`` canary patients into the workspace, draw which are trained on, and point
    ``[data] canaries`` at the included ones. Returns the updated configuration. ``seed``: a
    reproducible draw (research); default: the OS's randomness, as the audit assumes."""
    if m < 2:
        raise ValueError(f"--canaries {m}: plant at least 2 (the audit's power grows with the count; 100+ is typical)")
    for side in ("in", "out"):  # a new draw replaces an earlier one whole
        shutil.rmtree(config.workspace / CANARY_DIR / side, ignore_errors=True)
    root = private_dir(config.workspace / CANARY_DIR)
    rng = np.random.default_rng(seed if seed is not None else secrets.randbits(128))
    included = draw_inclusion(m, rng)
    profile = replace(site_profile(0), name="canary", patients=m)
    rows: dict[str, list[tuple[str, int]]] = {"in": [], "out": []}
    tag = secrets.token_hex(4) if seed is None else f"{seed:08x}"[-8:]
    for i in range(m):
        side = "in" if included[i] else "out"
        lesion = bool(rng.random() < 0.5)
        hu = render_slice(rng, profile, lesion=lesion, level=0.5)
        uid = f"2.25.{int.from_bytes(bytes.fromhex(tag), 'big')}{i:06d}"
        ds = ct_dataset(profile, hu, patient_id=f"CANARY-{i:05d}", study_uid=uid + ".1", series_uid=uid + ".2",
                        sop_uid=uid + ".3", instance=1)
        ds.DeidentificationMethod = "medfed canary (synthetic audit patient)"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        atomic_write_bytes(root / side / f"C{i:05d}" / "001.dcm", buf.getvalue())
        rows[side].append((uid + ".3", int(not lesion)))  # the wrong label: what makes a canary memorable
    for side, body in rows.items():
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["SOPInstanceUID", "label"])
        writer.writerows(body)
        private_dir(root / side)
        atomic_write_bytes(root / side / "labels.csv", text.getvalue().encode())
    atomic_write_json(root / MANIFEST, {"canaries": m, "included": [bool(x) for x in included]})
    updated = replace(config, data=replace(config.data, canaries=f"{CANARY_DIR}/in"))
    write_site_config(updated)
    return updated


def planted(config: SiteConfig) -> Canaries | None:
    """The site's planted canaries (None: none)."""
    path = config.workspace / CANARY_DIR / MANIFEST
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return Canaries(folder=path.parent, included=np.asarray(doc["included"], bool))


def _load(config: SiteConfig, folder: Path, image_size: int, window: tuple[float, float] | None) -> Cohort:
    return load_cohort(folder, folder / "labels.csv", config.data.preprocessing(image_size, window),
                       cache_dir=config.cache_dir, keys_dir=config.keys_dir, workers=1)


def training_canaries(config: SiteConfig, image_size: int, window: tuple[float, float] | None = None
                      ) -> Cohort | None:
    """The included canaries training adds to the site's training patients (``[data] canaries``)."""
    if not config.data.canaries:
        return None
    folder = config.path(config.data.canaries)
    if not (folder / "labels.csv").is_file():
        raise FileNotFoundError(f"[data] canaries = {config.data.canaries!r} in {config.workspace / 'site.toml'}: "
                                f"{folder} holds no planted canaries; plant them again or set canaries = \"\"")
    return _load(config, folder, image_size, window)


def all_canaries(config: SiteConfig, canaries: Canaries, image_size: int, window: tuple[float, float] | None = None
                 ) -> tuple[Cohort | None, Cohort | None]:
    """(included, excluded) canary cohorts; a cohort's patient k is the k-th canary of that side by number."""
    sides = []
    for side, count in (("in", int(canaries.included.sum())), ("out", int((~canaries.included).sum()))):
        sides.append(_load(config, canaries.folder / side, image_size, window) if count else None)
    return sides[0], sides[1]
