"""Site data path: labels join, patient split, errors that name the path, cache."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from client.dicom import Preprocessing, SiteDataError, load_cohort, read_pixels, split_patients
from client.dicom.preprocess import apply_window, resize


def _labels(path: Path) -> dict[str, int]:
    with open(path) as fh:
        return {r["SOPInstanceUID"]: int(r["label"]) for r in csv.DictReader(fh)}


def test_labels_join_each_image_to_its_own_label(small_site: Path) -> None:
    pre = Preprocessing(image_size=32)
    c = load_cohort(small_site, small_site / "labels.csv", pre)
    labels = _labels(small_site / "labels.csv")
    files = sorted(small_site.rglob("*.dcm"))
    assert len(c.labels) == len(files)
    # the cohort keeps file order: image i is file i, with file i's label and pixels
    for i in (0, len(files) // 2, len(files) - 1):
        ds = pydicom.dcmread(files[i])
        assert c.labels[i] == labels[ds.SOPInstanceUID]
        hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)[None]
        expected = apply_window(resize(hu, 32), float(ds.WindowCenter), float(ds.WindowWidth))[0]
        np.testing.assert_allclose(c.images[i], expected, atol=1e-6)


def test_read_pixels_matches_pydicom_modality_lut(small_site: Path) -> None:
    f = next(small_site.rglob("*.dcm"))
    ds = pydicom.dcmread(f)
    # exact: this site's profile stores slope 1 and intercept -1024, so float32 and pydicom's float64 both hold
    # the (integer) results exactly, on any CPU
    np.testing.assert_array_equal(read_pixels(f)[0], apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    ct = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    ds = pydicom.dcmread(ct)
    np.testing.assert_allclose(read_pixels(ct)[0], apply_modality_lut(ds.pixel_array, ds), rtol=1e-6)


def test_patients_grouped_and_split_without_overlap(small_site: Path) -> None:
    c = load_cohort(small_site, small_site / "labels.csv", Preprocessing(image_size=16))
    assert c.n_patients == 24
    assert sum(len(g) for g in c.patient_images()) == len(c.labels)
    train, val = split_patients(c, val_fraction=0.25, seed=3)
    assert train.n_patients + val.n_patients == 24
    assert len(train.labels) + len(val.labels) == len(c.labels)
    # no image appears on both sides (pixels identify images here)
    tr = {img.tobytes() for img in train.images}
    assert not tr & {img.tobytes() for img in val.images}
    # both classes are in validation, and the split is deterministic
    assert 0 < val.labels.sum() < len(val.labels)
    again, _ = split_patients(c, val_fraction=0.25, seed=3)
    np.testing.assert_array_equal(again.images, train.images)  # exact: the same rows selected again
    other, _ = split_patients(c, val_fraction=0.25, seed=4)
    assert other.images.shape != train.images.shape or not np.array_equal(other.images, train.images)


def test_patient_images_are_whole_patients(small_site: Path) -> None:
    c = load_cohort(small_site, small_site / "labels.csv", Preprocessing(image_size=16))
    ids = []
    files = sorted(small_site.rglob("*.dcm"))
    for group in c.patient_images():
        pids = {pydicom.dcmread(files[i], stop_before_pixels=True).PatientID for i in group}
        assert len(pids) == 1
        ids.append(pids.pop())
    assert len(set(ids)) == c.n_patients


def test_missing_and_empty_folders_name_the_path(tmp_path: Path, small_site: Path) -> None:
    with pytest.raises(SiteDataError, match=str(tmp_path / "nope")):
        load_cohort(tmp_path / "nope", small_site / "labels.csv", Preprocessing())
    (tmp_path / "empty").mkdir()
    with pytest.raises(SiteDataError, match="holds no DICOM files"):
        load_cohort(tmp_path / "empty", small_site / "labels.csv", Preprocessing())


def test_labels_missing_images_is_an_error_with_the_fix(tmp_path: Path, small_site: Path) -> None:
    rows = (small_site / "labels.csv").read_text().splitlines()
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(rows[:-3]) + "\n")
    with pytest.raises(SiteDataError) as info:
        load_cohort(small_site, partial, Preprocessing(image_size=16))
    msg = str(info.value)
    assert str(partial) in msg and "no label for 3 of" in msg and "allow_unlabelled" in msg
    c = load_cohort(small_site, partial, Preprocessing(image_size=16), allow_unlabelled=True)
    assert len(c.labels) == len(rows) - 1 - 3
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,y\n1,1\n")
    with pytest.raises(SiteDataError, match="must contain a key column"):
        load_cohort(small_site, bad, Preprocessing())
