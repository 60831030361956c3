"""The synthetic DICOM generator: valid files, seeded, non-IID sites."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from client.synth import generate_site, render_slice, site_profile


def test_files_read_cleanly_in_raise_mode(small_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    files = sorted(small_site.rglob("*.dcm"))
    assert len(files) >= 24 * 2  # several images per patient
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality",
                   "Rows", "Columns", "BitsStored", "PixelRepresentation", "RescaleSlope",
                   "RescaleIntercept", "WindowCenter", "WindowWidth", "PhotometricInterpretation"):
            assert kw in ds, kw
        hu = apply_modality_lut(ds.pixel_array, ds)
        assert hu.min() < -900 and hu.max() > 300  # air and bone present, in HU


def test_labels_cover_every_file_by_sop_uid(small_site: Path) -> None:
    with open(small_site / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in small_site.rglob("*.dcm")}
    assert {r["SOPInstanceUID"] for r in rows} == uids
    assert {r["label"] for r in rows} == {"0", "1"}


def test_same_seed_same_files_other_seed_differs(tmp_path: Path) -> None:
    prof = site_profile(1, patients=3)
    generate_site(tmp_path / "a", prof, seed=1)
    generate_site(tmp_path / "b", prof, seed=1)
    generate_site(tmp_path / "c", prof, seed=2)
    a = sorted((tmp_path / "a").rglob("*.dcm"))
    assert [f.read_bytes() for f in a] == [(tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes() for f in a]
    assert a[0].read_bytes() != (tmp_path / "c" / a[0].relative_to(tmp_path / "a")).read_bytes()


def test_sites_differ_like_hospitals() -> None:
    profiles = [site_profile(i) for i in range(4)]
    assert {p.signed for p in profiles} == {True, False}
    assert len({p.intercept for p in profiles}) >= 3
    assert len({p.noise_hu for p in profiles}) == 4
    assert len({p.prevalence for p in profiles}) == 4
    assert len({p.patients for p in profiles}) >= 3


def test_positive_slice_differs_by_one_small_bright_nodule() -> None:
    prof = dataclasses.replace(site_profile(0), noise_hu=0.0)
    pos = render_slice(np.random.default_rng(3), prof, lesion=True, level=0.5)
    neg = render_slice(np.random.default_rng(3), prof, lesion=False, level=0.5)
    diff = pos - neg  # same anatomy and vessels: only the nodule differs
    assert diff.min() >= 0
    assert diff.max() >= 300 / prof.difficulty * 0.9
    support = diff > 0.5 * diff.max()  # the nodule at half maximum
    assert 5 < support.sum() < 0.01 * diff.size
    ys, xs = np.nonzero(support)
    assert np.ptp(ys) < 30 and np.ptp(xs) < 30  # compact: one blob
