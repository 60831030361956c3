"""A site's cohort: DICOM folder + labels CSV -> preprocessed images grouped by patient."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.multival import MultiValue

from client.dicom.errors import DicomReadError, SiteDataError
from client.dicom.preprocess import Preprocessing, apply_window, resize
from client.dicom.reader import read_image
from privacy.files import atomic_write

LABEL_KEY = "SOPInstanceUID"


@dataclass(frozen=True)
class Cohort:
    """Preprocessed images of one site.

    ``patient`` maps each image to an index into the patient list; patient identifiers
    themselves never leave this object (and are not stored in the cache).
    """

    images: np.ndarray  # (N, S, S) float32 in [0, 1]
    labels: np.ndarray  # (N,) float32 0/1
    patient: np.ndarray  # (N,) int64 patient index
    n_patients: int

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
        return Cohort(self.images[keep], self.labels[keep], remap[self.patient[keep]], len(patients))


def read_labels(path: Path) -> dict[str, int]:
    """Read ``SOPInstanceUID,label`` rows; labels must be 0 or 1."""
    if not path.is_file():
        raise SiteDataError(
            f"labels file {path} does not exist: pass --labels CSV or put labels.csv in the data folder"
        )
    labels: dict[str, int] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or LABEL_KEY not in reader.fieldnames or "label" not in reader.fieldnames:
            raise SiteDataError(
                f"labels file {path}: header must contain columns '{LABEL_KEY}' and 'label' "
                f"(found {reader.fieldnames}); fix the first line of the CSV"
            )
        for line, row in enumerate(reader, start=2):
            value = (row.get("label") or "").strip()
            if value not in ("0", "1"):
                raise SiteDataError(
                    f"labels file {path}, line {line}: label must be 0 or 1; fix that row"
                )
            labels[(row.get(LABEL_KEY) or "").strip()] = int(value)
    if not labels:
        raise SiteDataError(f"labels file {path} has no rows: add one row per image")
    return labels


def dicom_files(folder: Path) -> list[Path]:
    """All regular files under ``folder`` that look like DICOM (sorted, hidden files skipped)."""
    if not folder.is_dir():
        raise SiteDataError(
            f"data folder {folder} does not exist or is not a folder: point --data at the "
            "folder of the site's DICOM export"
        )
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        with open(path, "rb") as fh:
            head = fh.read(132)
        if path.suffix.lower() == ".dcm" or head[128:132] == b"DICM":
            files.append(path)
    if not files:
        raise SiteDataError(
            f"data folder {folder} holds no DICOM files (*.dcm or files with the DICM preamble): "
            "point --data at the folder of the site's DICOM export"
        )
    return files


def _fingerprint(files: list[Path], folder: Path, labels_path: Path, pre: Preprocessing) -> str:
    h = hashlib.sha256(pre.key().encode())
    h.update(labels_path.read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _window(ds: object, pre: Preprocessing) -> tuple[float, float]:
    if pre.window is not None:
        return pre.window
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is None or width is None:
        return pre.fallback_window
    return _first(center), _first(width)


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS element."""
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def load_cohort(
    folder: Path, labels_path: Path, pre: Preprocessing, *, cache_dir: Path | None = None,
    allow_unlabelled: bool = False,
) -> Cohort:
    """Read, label and preprocess every image under ``folder``.

    With ``cache_dir``, the result is stored there once per (file listing, labels,
    preprocessing) and later calls read the cache instead of the DICOM files.
    """
    folder, labels_path = Path(folder), Path(labels_path)
    files = dicom_files(folder)
    labels = read_labels(labels_path)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"cohort-{_fingerprint(files, folder, labels_path, pre)}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as z:
                return Cohort(z["images"], z["labels"], z["patient"], int(z["n_patients"]))

    images, ys, pids, unlabelled, errors = [], [], [], 0, []
    for path in files:
        try:
            ds, pixels = read_image(path)
        except DicomReadError as exc:
            errors.append(f"{path.relative_to(folder)}: {exc.reason}")
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid not in labels:
            unlabelled += 1
            continue
        center, width = _window(ds, pre)
        frame = pixels[pixels.shape[0] // 2 : pixels.shape[0] // 2 + 1]
        images.append(resize(apply_window(frame, center, width), pre.image_size)[0])
        ys.append(labels[uid])
        pids.append(str(ds.get("PatientID", "")))
    if unlabelled and not allow_unlabelled:
        raise SiteDataError(
            f"labels file {labels_path} has no label for {unlabelled} of {len(files)} images in "
            f"{folder}: add their SOPInstanceUIDs to the CSV, or set allow_unlabelled = true in "
            "site.toml to train on the labelled ones only"
        )
    if not images:
        detail = f" ({len(errors)} unreadable, first: {errors[0]})" if errors else ""
        raise SiteDataError(
            f"no labelled, readable image in {folder} matches {labels_path}{detail}: check that "
            "the labels CSV belongs to this export"
        )
    uniq = sorted(set(pids))
    index = {p: i for i, p in enumerate(uniq)}
    cohort = Cohort(
        np.stack(images).astype(np.float32),
        np.asarray(ys, dtype=np.float32),
        np.asarray([index[p] for p in pids], dtype=np.int64),
        len(uniq),
    )
    if cache_file is not None:
        buf = io.BytesIO()
        np.savez(buf, images=cohort.images, labels=cohort.labels, patient=cohort.patient,
                 n_patients=cohort.n_patients)
        atomic_write(cache_file, lambda fh: fh.write(buf.getvalue()))
    return cohort


def split_patients(cohort: Cohort, *, val_fraction: float, seed: int) -> tuple[Cohort, Cohort]:
    """Split into (train, validation) **by patient**, stratified by patient label.

    No patient has images on both sides. Deterministic for a given seed.
    """
    patient_label = np.zeros(cohort.n_patients)
    np.maximum.at(patient_label, cohort.patient, cohort.labels)
    rng = np.random.default_rng(seed)
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


__all__ = ["Cohort", "load_cohort", "split_patients", "read_labels", "dicom_files"]
