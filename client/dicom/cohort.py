"""A site's cohort: DICOM folder + labels CSV -> preprocessed images grouped by patient."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.dicom.errors import SiteDataError
from client.dicom.ingest import Ingested, candidate_files, ingest, require_folder
from client.dicom.preprocess import Preprocessing
from privacy.egress import fingerprint

LABEL_KEYS = ("SOPInstanceUID", "path", "StudyInstanceUID")  # accepted key columns, in this order


@dataclass(frozen=True)
class Cohort:
    """Preprocessed images of one site.

    ``patient`` maps each image to an index into the patient list; patient identifiers
    themselves never leave this object (and are not stored in the cache).
    """

    images: np.ndarray  # (N, S, S) float32 in [0, 1]; several windows as channels: (N, C, S, S)
    labels: np.ndarray  # (N,) float32 0/1; multi-label: (N, findings)
    patient: np.ndarray  # (N,) int64 patient index
    n_patients: int
    fingerprint: str = ""  # sha256 over the labelled files' content hashes and labels (the whole site)

    def patient_images(self) -> list[np.ndarray]:
        """Image indices of each patient (the DP unit)."""
        order = np.argsort(self.patient, kind="stable")
        bounds = np.searchsorted(self.patient[order], np.arange(self.n_patients + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(self.n_patients)]

    def subset(self, patients: np.ndarray) -> Cohort:
        """The cohort restricted to the given patient indices (re-indexed from 0)."""
        keep = np.isin(self.patient, patients)
        remap = np.full(self.n_patients, -1, dtype=np.int64)
        remap[np.sort(patients)] = np.arange(len(patients))
        return Cohort(self.images[keep], self.labels[keep], remap[self.patient[keep]], len(patients), self.fingerprint)

    def joined(self, other: Cohort) -> Cohort:
        """This cohort followed by ``other`` (its patients numbered after these); keeps this fingerprint."""
        return Cohort(np.concatenate([self.images, other.images]), np.concatenate([self.labels, other.labels]),
                      np.concatenate([self.patient, other.patient + self.n_patients]),
                      self.n_patients + other.n_patients, self.fingerprint)


@dataclass(frozen=True)
class Labels:
    """A labels CSV: which header column keys the rows, and ``key value -> 0/1`` (binary) or
    ``key value -> (0/1, ...)`` (one per finding, in the run's order)."""

    column: str
    values: dict[str, int] | dict[str, tuple[int, ...]]


def read_labels(path: Path, findings: tuple[str, ...] = ()) -> Labels:
    """Read ``KEY,label`` rows (or ``KEY,finding1,finding2,...`` for a multi-label run); KEY is
    SOPInstanceUID, path (relative to the data folder) or StudyInstanceUID (the first of these
    the header has); every label must be 0 or 1."""
    if not path.is_file():
        raise SiteDataError(
            f"labels file {path} does not exist: pass --labels CSV or put labels.csv in the data folder"
        )
    try:
        return _read_labels(path, findings)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SiteDataError(f"labels file {path} is not a UTF-8 CSV ({type(exc).__name__}); export it again as "
                            "CSV (UTF-8)") from None


def _read_labels(path: Path, findings: tuple[str, ...]) -> Labels:
    columns = findings or ("label",)
    values: dict = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(fh)
        names = reader.fieldnames or []
        column = next((k for k in LABEL_KEYS if k in names), None)
        missing = [c for c in columns if c not in names]
        if column is None or missing:
            raise SiteDataError(
                f"labels file {path}: header must contain a key column ({', '.join(LABEL_KEYS)}) and the label "
                f"column(s) {', '.join(repr(c) for c in columns)} (found {len(names)} columns, "
                f"{len(missing)} label column(s) missing); fix the first line of the CSV or the run's findings"
            )
        for line, row in enumerate(reader, start=2):
            cells = [(row.get(c) or "").strip() for c in columns]
            bad = next((c for c, v in zip(columns, cells, strict=True) if v not in ("0", "1")), None)
            if bad is not None:
                raise SiteDataError(f"labels file {path}, line {line}: column {bad!r} must be 0 or 1; fix that row")
            ints = tuple(int(v) for v in cells)
            values[(row.get(column) or "").strip()] = ints if findings else ints[0]
    if not values:
        raise SiteDataError(f"labels file {path} has no rows: add one row per image")
    return Labels(column, values)


@dataclass(frozen=True)
class Joined:
    """Which ingested image files have a label, and how many labels matched nothing."""

    label_of: dict[int, Any]  # file index in Ingested -> label (an int, or a tuple per finding)
    unlabelled: int
    labels_without_image: int


def join_labels(data: Ingested, labels: Labels) -> Joined:
    """Match labels to image files by the CSV's key column (UIDs compared as keyed hashes)."""
    if labels.column == "path":
        by_key = {k.replace("\\", "/"): v for k, v in labels.values.items()}
        keys = data.rels
    else:
        by_key = {fingerprint(data.key, k): v for k, v in labels.values.items() if k}
        attr = "sop" if labels.column == "SOPInstanceUID" else "study"
        keys = [getattr(r, attr) for r in data.records]
    label_of, used, unlabelled = {}, set(), 0
    for i, (k, rec) in enumerate(zip(keys, data.records, strict=True)):
        if rec.status != "image":
            continue
        if k in by_key:
            label_of[i] = by_key[k]
            used.add(k)
        else:
            unlabelled += 1
    return Joined(label_of, unlabelled, len(set(by_key) - used))


def load_cohort(
    folder: Path, labels_path: Path, pre: Preprocessing, *, cache_dir: Path | None = None,
    keys_dir: Path | None = None, allow_unlabelled: bool = False, workers: int = 0, progress: bool = False,
    findings: tuple[str, ...] = (), channels: tuple[tuple[float, float], ...] = (),
) -> Cohort:
    """Read, label and preprocess every image under ``folder``.

    With ``cache_dir``, decoded frames are cached there per (file content, preprocessing)
    and later calls do not open the DICOM files again. ``channels``: two or more VOI windows,
    one input channel each (images ``(N, C, S, S)``); each window is one cached preprocessing,
    so a first pass decodes every file once per window.
    """
    folder, labels_path = require_folder(folder), Path(labels_path)
    if not candidate_files(folder, exclude=[labels_path]):
        raise SiteDataError(f"data folder {folder} holds no DICOM files: point --data at the folder of the "
                            "site's DICOM export")
    labels = read_labels(labels_path, findings)
    data = ingest(folder, replace(pre, window=channels[0]) if len(channels) > 1 else pre, cache_dir=cache_dir,
                  keys_dir=keys_dir, workers=workers, progress=progress, exclude=[labels_path])
    if len(channels) > 1:
        more = [ingest(folder, replace(pre, window=w), cache_dir=cache_dir, keys_dir=keys_dir, workers=workers,
                       progress=progress, exclude=[labels_path]).frames for w in channels[1:]]
        data = replace(data, frames=np.stack([data.frames, *more], axis=1))
    images = sum(r.status == "image" for r in data.records)
    if images == 0:
        errors = [f"{rel}: {r.reason}" for rel, r in zip(data.rels, data.records, strict=True) if r.status == "error"]
        detail = f" ({len(errors)} unreadable, first: {errors[0]})" if errors else ""
        raise SiteDataError(f"data folder {folder} holds no readable DICOM image{detail}: point --data at the "
                            "folder of the site's DICOM export (run `medfed-site check` for details)")
    joined = join_labels(data, labels)
    if joined.unlabelled and not allow_unlabelled:
        raise SiteDataError(
            f"labels file {labels_path} has no label for {joined.unlabelled} of {images} images in "
            f"{folder}: add their {labels.column} to the CSV, or set allow_unlabelled = true in "
            "site.toml to train on the labelled ones only"
        )
    if not joined.label_of:
        raise SiteDataError(
            f"no labelled, readable image in {folder} matches {labels_path}: check that "
            "the labels CSV belongs to this export"
        )
    return _assemble(data, joined)


def _assemble(data: Ingested, joined: Joined) -> Cohort:
    rows: list[int] = []
    ys: list[Any] = []
    pids: list[str] = []
    for i, label in sorted(joined.label_of.items()):
        lo, hi = int(data.offsets[i]), int(data.offsets[i + 1])
        rows.extend(range(lo, hi))
        ys.extend([label] * (hi - lo))
        pids.extend([data.records[i].patient] * (hi - lo))
    print_ = hashlib.sha256()
    for i, label in sorted(joined.label_of.items(), key=lambda item: data.digests[item[0]]):
        text = ",".join(map(str, label)) if isinstance(label, tuple) else label
        print_.update(f"{data.digests[i]}:{text}\n".encode())
    index: dict[str, int] = {}
    for p in pids:  # patients numbered in order of first appearance (sorted paths): reproducible
        index.setdefault(p, len(index))
    return Cohort(
        np.ascontiguousarray(data.frames[rows]),
        np.asarray(ys, dtype=np.float32),
        np.asarray([index[p] for p in pids], dtype=np.int64),
        len(index),
        print_.hexdigest(),
    )


def split_patients(cohort: Cohort, *, val_fraction: float, seed: int) -> tuple[Cohort, Cohort]:
    """Split into (train, validation) **by patient**: stratified by the binary label; a multi-label
    cohort is split without looking at the labels.

    No patient has images on both sides. Deterministic for a given seed. A multi-label run's label
    columns are the server's choice (among those the site offers): a split stratified by them would
    make the released patient counts a function of the chosen columns' values.
    """
    rng = np.random.default_rng(seed)
    if cohort.labels.ndim == 2:
        k = int(round(val_fraction * cohort.n_patients)) if cohort.n_patients >= 2 else 0
        val_ids = np.sort(rng.permutation(cohort.n_patients)[:k])
        return cohort.subset(np.setdiff1d(np.arange(cohort.n_patients), val_ids)), cohort.subset(val_ids)
    patient_label = np.zeros(cohort.n_patients)
    np.maximum.at(patient_label, cohort.patient, cohort.labels)
    val: list[np.ndarray] = []
    for cls in (0.0, 1.0):
        members = np.flatnonzero(patient_label == cls)
        if len(members) < 2:
            continue
        k = max(1, int(round(val_fraction * len(members))))
        val.append(rng.permutation(members)[:k])
    val_ids = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_ids = np.setdiff1d(np.arange(cohort.n_patients), val_ids)
    return cohort.subset(train_ids), cohort.subset(val_ids)


__all__ = ["Cohort", "Labels", "load_cohort", "split_patients", "read_labels", "join_labels"]
