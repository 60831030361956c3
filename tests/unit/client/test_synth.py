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


def test_radiograph_sites_have_independent_findings_a_model_can_see(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Three 0/1 columns, each finding changes the image where it should (real DICOM, read back by pydicom)."""
    import csv as csv_

    import numpy as np_
    import pydicom

    from client.synth_radiograph import FINDINGS, generate_radiograph_site, radiograph_profile, render_radiograph

    summary = generate_radiograph_site(tmp_path / "dx", radiograph_profile(0, patients=40), seed=3)
    with open(tmp_path / "dx" / "labels.csv", newline="") as fh:
        rows = list(csv_.DictReader(fh))
    assert list(rows[0]) == ["SOPInstanceUID", *FINDINGS] and len(rows) == summary.images >= 40
    counts = {f: sum(int(r[f]) for r in rows) for f in FINDINGS}
    assert all(0 < c < len(rows) for c in counts.values()), counts
    ds = pydicom.dcmread(next((tmp_path / "dx").rglob("*.dcm")))
    assert ds.Modality == "DX" and ds.pixel_array.shape == (256, 256) and ds.pixel_array.max() <= 4095
    profile = radiograph_profile(0)
    base = np_.mean([render_radiograph(np_.random.default_rng(i), profile, (0, 0, 0)) for i in range(8)], axis=0)
    heart = np_.mean([render_radiograph(np_.random.default_rng(i), profile, (0, 0, 1)) for i in range(8)], axis=0)
    fluid = np_.mean([render_radiograph(np_.random.default_rng(i), profile, (0, 1, 0)) for i in range(8)], axis=0)
    n = profile.size
    assert heart[int(0.65 * n), n // 2:].mean() > base[int(0.65 * n), n // 2:].mean() + 0.02  # a wider heart shadow
    lower = slice(int(0.65 * n), int(0.78 * n))  # the rows of the lung bases
    assert fluid[lower].mean() > base[lower].mean() + 0.01  # denser lung bases
