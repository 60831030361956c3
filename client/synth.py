"""Seeded synthetic hospitals: chest-CT-like DICOM slices, labels.csv, non-IID sites."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

LABELS_FILE = "labels.csv"
DEFAULT_DIFFICULTY = 1.0

# Storage conventions real CT scanners use: (signed, slope, intercept, bits stored).
_STORAGE = (
    (False, 1.0, -1024.0, 12),
    (True, 1.0, 0.0, 16),
    (False, 1.0, -1000.0, 16),
    (True, 0.5, -512.0, 16),
)


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital acquires and stores its images."""

    name: str
    patients: int
    min_images: int
    max_images: int
    prevalence: float
    noise_hu: float
    size: int
    signed: bool
    slope: float
    intercept: float
    bits_stored: int
    difficulty: float = DEFAULT_DIFFICULTY


def site_profile(
    index: int, *, patients: int | None = None, difficulty: float = DEFAULT_DIFFICULTY
) -> SiteProfile:
    """Return the profile of virtual hospital ``index``: sites differ like real hospitals.

    Scanner noise, pixel storage (signed/unsigned, slope, intercept), matrix size,
    prevalence and patient count all vary with the index, so the sites are not IID.
    """
    signed, slope, intercept, bits = _STORAGE[index % len(_STORAGE)]
    return SiteProfile(
        name=f"site-{index + 1}",
        patients=patients if patients is not None else (900, 600, 1200, 720)[index % 4],
        min_images=2,
        max_images=(4, 5, 3, 6)[index % 4],
        prevalence=(0.35, 0.5, 0.25, 0.4)[index % 4],
        noise_hu=(25.0, 45.0, 35.0, 60.0)[index % 4],
        size=(128, 160, 128, 144)[index % 4],
        signed=signed,
        slope=slope,
        intercept=intercept,
        bits_stored=bits,
        difficulty=difficulty,
    )


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_site` wrote (counts only; no patient values)."""

    folder: str
    patients: int
    images: int
    positives: int


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _add_blob(img: np.ndarray, coords: np.ndarray, cy: float, cx: float, sigma: float, amp: float) -> None:
    """Add a Gaussian blob in place, touching only the 4-sigma window around it."""
    n = img.shape[0]
    half = 4.0 * sigma
    y0, y1 = np.searchsorted(coords, [cy - half, cy + half])
    x0, x1 = np.searchsorted(coords, [cx - half, cx + half])
    if y0 >= min(y1, n) or x0 >= min(x1, n):
        return
    dy = (coords[y0:y1] - cy)[:, None]
    dx = (coords[x0:x1] - cx)[None, :]
    img[y0:y1, x0:x1] += amp * np.exp(-(dy**2 + dx**2) / (2.0 * sigma**2))


def render_slice(
    rng: np.random.Generator, profile: SiteProfile, *, lesion: bool, level: float
) -> np.ndarray:
    """Render one axial chest slice in Hounsfield units (float32, ``size``×``size``).

    ``level`` in [0, 1] is the slice position: lungs are larger mid-chest. Positive
    slices carry one small round nodule inside a lung; vessels are the distractors.
    """
    n = profile.size
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    px = 2.0 / n  # one pixel in normalised units
    img = np.full((n, n), -1000.0, dtype=np.float32)

    body_ry, body_rx = 0.62 * rng.uniform(0.92, 1.05), 0.86 * rng.uniform(0.92, 1.05)
    img[_ellipse(yy, xx, 0.05, 0.0, body_ry, body_rx)] = -100.0  # subcutaneous fat
    img[_ellipse(yy, xx, 0.05, 0.0, body_ry - 0.05, body_rx - 0.05)] = 40.0  # muscle
    lung_scale = 0.75 + 0.25 * np.sin(np.pi * level)
    lungs = []
    for side in (-1.0, 1.0):
        cy, cx = -0.02 + rng.normal(0, 0.02), side * 0.36 + rng.normal(0, 0.02)
        ry, rx = 0.40 * lung_scale, 0.25 * lung_scale
        mask = _ellipse(yy, xx, cy, cx, ry, rx)
        img[mask] = -850.0
        lungs.append((cy, cx, ry, rx))
    img[_ellipse(yy, xx, 0.12, 0.06, 0.22, 0.19)] = 45.0  # heart / mediastinum
    img[_ellipse(yy, xx, 0.52, 0.0, 0.10, 0.10)] = 700.0  # vertebral body
    img[_ellipse(yy, xx, 0.52, 0.0, 0.04, 0.04)] = 20.0  # spinal canal
    for angle in np.linspace(0.25 * np.pi, 0.75 * np.pi, 4):  # ribs, both sides
        for side in (-1.0, 1.0):
            ry, rx = body_ry - 0.09, body_rx - 0.09
            img[_ellipse(yy, xx, 0.05 + ry * np.sin(angle + np.pi), side * rx * np.cos(angle), 0.03, 0.025)] = 600.0

    def point_in_lung(reach: float) -> tuple[float, float]:
        side = int(rng.integers(2))
        cy, cx, ry, rx = lungs[side]
        r, t = reach * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        # shift laterally, away from the mediastinum
        return cy + r * ry * np.sin(t), cx + (side - 0.5) * 0.3 * rx + r * rx * 0.7 * np.cos(t)

    for _ in range(int(rng.integers(4, 10))):  # vessels: small bright dots
        vy, vx = point_in_lung(0.8)
        sigma = rng.uniform(0.6, 1.3) * px * n / 128
        _add_blob(img, coords, vy, vx, sigma, rng.uniform(250, 550))
    if lesion:
        ly, lx = point_in_lung(0.6)
        sigma = rng.uniform(2.5, 5.0) * px * n / 128
        _add_blob(img, coords, ly, lx, sigma, rng.uniform(300.0, 2000.0) / profile.difficulty)
    img += rng.normal(0.0, profile.noise_hu, size=img.shape).astype(np.float32)
    return img


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def synthetic_dataset(sop_class: UID, modality: str, *, patient_id: str, study_uid: str, series_uid: str,
                      sop_uid: str, instance: int) -> Dataset:
    """The file meta, identity and de-identification tags every generated image shares."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "medfed synthetic generator"
    ds.Modality = modality
    ds.Manufacturer = "medfed-synth"
    ds.StudyDate = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    return ds


def ct_dataset(
    profile: SiteProfile, hu: np.ndarray, *, patient_id: str, study_uid: str, series_uid: str,
    sop_uid: str, instance: int,
) -> Dataset:
    ds = synthetic_dataset(CTImageStorage, "CT", patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
                           sop_uid=sop_uid, instance=instance)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.PixelSpacing = [f"{350.0 / hu.shape[0]:.4f}"] * 2
    ds.SliceThickness = "5.0"
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 1 if profile.signed else 0
    ds.RescaleSlope = f"{profile.slope:g}"
    ds.RescaleIntercept = f"{profile.intercept:g}"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"

    stored = np.rint((hu - profile.intercept) / profile.slope)
    if profile.signed:
        lo, hi = -(2 ** (profile.bits_stored - 1)), 2 ** (profile.bits_stored - 1) - 1
        dtype: type[np.integer] = np.int16
    else:
        lo, hi = 0, 2**profile.bits_stored - 1
        dtype = np.uint16
    ds.PixelData = np.clip(stored, lo, hi).astype(dtype).tobytes()
    return ds


def generate_site(out_dir: Path, profile: SiteProfile, *, seed: int) -> SynthSummary:
    """Write one synthetic hospital under ``out_dir``: DICOM files plus ``labels.csv``.

    Deterministic for a given (profile, seed). Files are grouped ``<patient>/<n>.dcm``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"{profile.name}/{seed}".encode()).hexdigest()[:8]
    rng = np.random.default_rng([seed, int(tag, 16)])
    rows: list[tuple[str, int]] = []
    positives = 0
    for p in range(profile.patients):
        patient_id = f"SYN{tag}{p:05d}"
        study_uid = _uid(tag, p, "study")
        series_uid = _uid(tag, p, "series")
        label = int(rng.uniform() < profile.prevalence)
        positives += label
        n_images = int(rng.integers(profile.min_images, profile.max_images + 1))
        folder = out_dir / f"P{p:05d}"
        folder.mkdir(exist_ok=True)
        for i in range(n_images):
            level = (i + 0.5) / n_images
            hu = render_slice(rng, profile, lesion=bool(label), level=level)
            sop_uid = _uid(tag, p, i, "sop")
            ds = ct_dataset(profile, hu, patient_id=patient_id, study_uid=study_uid,
                          series_uid=series_uid, sop_uid=sop_uid, instance=i + 1)
            ds.save_as(folder / f"{i + 1:03d}.dcm", enforce_file_format=True)
            rows.append((sop_uid, label))
    with open(out_dir / LABELS_FILE, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["SOPInstanceUID", "label"])
        writer.writerows(rows)
    (out_dir / "synth.json").write_text(json.dumps({"profile": asdict(profile), "seed": seed}, indent=2))
    return SynthSummary(folder=str(out_dir), patients=profile.patients, images=len(rows),
                        positives=positives)
