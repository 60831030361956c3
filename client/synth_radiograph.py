"""Seeded synthetic chest radiographs (frontal DX) with several independent findings, for multi-label runs.

Each patient has one or two frontal views; each finding is present or absent per patient,
independently, with the site's prevalence:

- ``nodule``: a small round opacity inside a lung field;
- ``effusion``: a dense, meniscus-topped opacity filling the base of one lung (a blunted angle);
- ``cardiomegaly``: a heart shadow wider than half the chest (cardiothoracic ratio > 0.5).

``labels.csv`` holds ``SOPInstanceUID,nodule,effusion,cardiomegaly``. Sites differ in detector
noise, exposure, matrix size and prevalence (not IID), as the CT generator's sites do.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from client.synth import LABELS_FILE, SynthSummary, synthetic_dataset

FINDINGS = ("nodule", "effusion", "cardiomegaly")
DIGITAL_XRAY = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
BITS = 12


@dataclass(frozen=True)
class RadiographProfile:
    """How one synthetic hospital's radiography room acquires and stores its images."""

    name: str
    patients: int
    prevalence: tuple[float, float, float]  # per finding, in FINDINGS order
    noise: float  # detector noise, in units of the full intensity range
    exposure: float  # overall brightness scale
    size: int
    difficulty: float = 1.0  # > 1 makes every finding fainter or smaller


def radiograph_profile(index: int, *, patients: int | None = None, difficulty: float = 1.0) -> RadiographProfile:
    """Virtual radiography site ``index`` (sites differ like real hospitals)."""
    return RadiographProfile(
        name=f"site-{index + 1}",
        patients=patients if patients is not None else (300, 240, 360, 200)[index % 4],
        prevalence=((0.3, 0.25, 0.35), (0.4, 0.2, 0.3), (0.25, 0.35, 0.4), (0.35, 0.3, 0.25))[index % 4],
        noise=(0.02, 0.035, 0.025, 0.045)[index % 4],
        exposure=(1.0, 0.9, 1.1, 0.95)[index % 4],
        size=(256, 224, 256, 240)[index % 4],
        difficulty=difficulty,
    )


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def render_radiograph(rng: np.random.Generator, profile: RadiographProfile, findings: tuple[int, int, int]) -> np.ndarray:
    """One frontal chest radiograph, float32 in [0, 1] (1 = dense: bone, heart, fluid), ``size``²."""
    n = profile.size
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    d = profile.difficulty
    img = np.full((n, n), 0.15, dtype=np.float32)
    img[_ellipse(yy, xx, 0.05, 0.0, 0.95, 0.85 * rng.uniform(0.95, 1.05))] = 0.55  # soft tissue of the chest
    lungs = []
    for side in (-1.0, 1.0):
        cy, cx, ry, rx = -0.05 + rng.normal(0, 0.02), side * 0.38, 0.62 * rng.uniform(0.95, 1.05), 0.27
        img[_ellipse(yy, xx, cy, cx, ry, rx)] = 0.2  # aerated lung: dark
        lungs.append((cy, cx, ry, rx))
    for k in range(7):  # ribs: faint bright arcs over both lungs
        y0 = -0.55 + 0.17 * k
        band = np.abs(yy - (y0 + 0.12 * xx**2)) < 0.018
        img[band & (np.abs(xx) < 0.7)] += 0.12
    img[np.abs(xx) < 0.06] = 0.8  # spine and mediastinum
    # cardiothoracic ratio: normal 0.38-0.47; enlarged above, by less the harder the site
    ratio = rng.uniform(0.38, 0.47) if not findings[2] else rng.uniform(0.43, 0.49) + rng.uniform(0.0, 0.12) / d
    heart_rx = ratio * 0.85  # the heart's width against the chest's (cardiothoracic ratio)
    img[_ellipse(yy, xx, 0.3, 0.08, 0.28, heart_rx)] = 0.75
    if findings[0]:  # nodule inside a lung field
        cy, cx, ry, rx = lungs[int(rng.integers(2))]
        r, t = 0.6 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        ny, nx = cy - 0.2 * ry + r * ry * 0.6 * np.sin(t), cx + r * rx * 0.6 * np.cos(t)
        sigma = rng.uniform(0.035, 0.06)
        img += (0.4 / d) * np.exp(-((yy - ny) ** 2 + (xx - nx) ** 2) / (2 * sigma**2))
    if findings[1]:  # effusion: the base of one lung filled, meniscus on top
        cy, cx, ry, rx = lungs[int(rng.integers(2))]
        top = cy + ry * (0.75 - rng.uniform(0.2, 0.45))
        fluid = _ellipse(yy, xx, cy, cx, ry, rx) & (yy > top + 0.15 * ((xx - cx) / rx) ** 2)
        img[fluid] += 0.25 / d  # denser than aerated lung; fainter the harder the site
    img = img * profile.exposure + rng.normal(0.0, profile.noise, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def _dataset(pixels: np.ndarray, *, patient_id: str, study_uid: str, sop_uid: str, instance: int) -> Dataset:
    ds = synthetic_dataset(DIGITAL_XRAY, "DX", patient_id=patient_id, study_uid=study_uid,
                           series_uid=generate_uid(entropy_srcs=[study_uid, "series"]), sop_uid=sop_uid,
                           instance=instance)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{430.0 / pixels.shape[0]:.4f}"] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = BITS
    ds.HighBit = BITS - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = str(2 ** (BITS - 1))
    ds.WindowWidth = str(2**BITS)
    ds.PixelData = np.rint(pixels * (2**BITS - 1)).astype(np.uint16).tobytes()
    return ds


def generate_radiograph_site(out_dir: Path, profile: RadiographProfile, *, seed: int) -> SynthSummary:
    """Write one synthetic radiography site: ``<patient>/<n>.dcm`` and a multi-label ``labels.csv``.

    Deterministic for a given (profile, seed); ``positives`` counts patients with any finding."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"dx/{profile.name}/{seed}".encode()).hexdigest()[:8]
    rng = np.random.default_rng([seed, int(tag, 16)])
    rows: list[tuple[str, int, int, int]] = []
    positives = 0
    for p in range(profile.patients):
        present = tuple(int(rng.uniform() < q) for q in profile.prevalence)
        findings = (present[0], present[1], present[2])
        positives += int(any(findings))
        study_uid = generate_uid(entropy_srcs=[tag, str(p), "study"])
        folder = out_dir / f"P{p:05d}"
        folder.mkdir(exist_ok=True)
        for i in range(int(rng.integers(1, 3))):
            sop_uid = generate_uid(entropy_srcs=[tag, str(p), str(i), "sop"])
            ds = _dataset(render_radiograph(rng, profile, findings), patient_id=f"DX{tag}{p:05d}",
                          study_uid=study_uid, sop_uid=sop_uid, instance=i + 1)
            ds.save_as(folder / f"{i + 1:03d}.dcm", enforce_file_format=True)
            rows.append((sop_uid, *findings))
    with open(out_dir / LABELS_FILE, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["SOPInstanceUID", *FINDINGS])
        writer.writerows(rows)
    (out_dir / "synth.json").write_text(json.dumps({"kind": "radiograph", "profile": asdict(profile), "seed": seed},
                                                   indent=2))
    return SynthSummary(folder=str(out_dir), patients=profile.patients, images=len(rows), positives=positives)
