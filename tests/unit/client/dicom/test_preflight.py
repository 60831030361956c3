"""`medfed-site check`: the report's values, exit codes, multi-frame policy, label keys,
window precedence, and no identifying value in any output or in the cache."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.config import DataConfig
from client.dicom import Preprocessing, deid, load_cohort
from client.dicom.errors import DicomReadError
from client.dicom.identifiers import load_fingerprints
from client.dicom.ingest import ingest
from client.dicom.reader import parse
from privacy.egress import fingerprint
from tests.conftest import make_workspace
from tests.helpers import PLANTED, PLANTED_ID, PLANTED_NESTED, plant_identifiers

ROOT = Path(__file__).parents[4]
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client.cli", "check", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_check_reports_the_export(tmp_path: Path, small_site: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_site, data)
    dcm = sorted(data.rglob("*.dcm"))
    shutil.copy(TEST_FILES / "rtplan.dcm", data / "plan.dcm")
    (data / "broken.dcm").write_bytes(dcm[0].read_bytes()[:-500])
    with open(data / "labels.csv", "a") as fh:
        fh.write("1.2.3.4.5.6.7.8.9,1\n")  # a label whose image is not in the export
    r = _check("--data", str(data), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["files"] == len(dcm) + 3  # + plan, broken, synth.json (labels.csv is the labels)
    assert report["images"] == report["frames"] == len(dcm) and report["patients"] == 24
    assert report["studies"] == 24 and report["unlabelled"] == 0 and report["labels_without_image"] == 1
    assert {s["path"] for s in report["skipped"]} == {"plan.dcm", "synth.json"}
    assert [e["path"] for e in report["errors"]] == ["broken.dcm"] and "truncated" in report["errors"][0]["reason"]
    assert report["modalities"] == {"CT": len(dcm)} and report["phi_tags"]["PatientID"] == len(dcm) + 2
    assert report["transfer_syntaxes"]["Explicit VR Little Endian"] >= len(dcm)
    assert report["burned_in"] == 0 and isinstance(report["seconds"], float)

    (data / "labels.csv").write_text("SOPInstanceUID,label\n1.2.3,0\n")
    r = _check("--data", str(data), "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["unlabelled"] == len(dcm)
    r = _check("--data", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_no_identifying_value_in_outputs_or_cache(tmp_path: Path, small_site: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_site, data)
    planted = plant_identifiers(data) + 1  # + the truncated copy of one (its header is intact)
    ws = make_workspace(tmp_path, "site-a", data)
    outputs = []
    for args in (["--data", str(data), "--json"], ["--data", str(data)], ["--workspace", str(ws), "--json"],
                 ["--workspace", str(ws)]):
        r = _check(*args)
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout + r.stderr)
    report = json.loads(outputs[0])
    assert report["phi_tags"]["PatientName"] == planted and report["phi_tags"]["PatientBirthDate"] == planted
    assert report["phi_tags"]["ImageComments"] == planted and report["burned_in"] == 2
    assert report["phi_tags"]["RequestingPhysician"] == planted  # only inside a sequence item
    found = load_fingerprints(ws / "keys")  # the workspace's keys/, not its cache
    assert found is not None
    prints, key = found.prints, found.key
    assert fingerprint(key, PLANTED_NESTED) in prints and fingerprint(key, PLANTED_ID) in prints
    assert "identifying attributes present" in outputs[1] and f"PatientAddress {planted}" in outputs[1]
    cached = b"".join(p.read_bytes() for p in (ws / "cache").rglob("*") if p.is_file())
    for value in [*PLANTED.values(), PLANTED_ID, PLANTED_NESTED, "ZEBRA", "QUOKKA", "Wombat", "19230405"]:
        for out in outputs:
            assert value not in out
        assert value.encode() not in cached
    # the two planted patients now share one PatientID: one patient for the DP unit
    c = load_cohort(data, data / "labels.csv", Preprocessing(image_size=16))
    assert c.n_patients == 24 - 2 + 1


def test_sequences_without_a_profile_tag_are_skipped_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan leaves unparsed the sequences whose bytes hold no profile tag; on every
    bundled file that finds exactly what parsing every sequence finds."""
    skipped: list[str] = []
    checked = deid._may_hold_phi

    def recording(ds: pydicom.Dataset, tag: int) -> bool:
        keep = checked(ds, tag)
        if not keep:
            skipped.append(str(tag))
        return keep

    key = b"k" * 32
    compared = 0
    for path in sorted(p for p in TEST_FILES.rglob("*") if p.is_file()):
        try:
            fast_ds, full_ds = parse(path, path.name), parse(path, path.name)
        except DicomReadError:
            continue
        monkeypatch.setattr(deid, "_may_hold_phi", recording)
        fast = deid.scan(fast_ds, key)
        monkeypatch.setattr(deid, "_may_hold_phi", lambda ds, tag: True)
        assert fast == deid.scan(full_ds, key), path.name
        compared += 1
    assert compared > 150 and len(skipped) >= 20


def test_multiframe_policy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(TEST_FILES / "rtdose.dcm", data / "dose.dcm")  # 15 frames
    shutil.copy(TEST_FILES / "CT_small.dcm", data / "ct.dcm")
    counts = {}
    for policy in ("middle", "all", "reject"):
        got = ingest(data, Preprocessing(image_size=8, frames=policy), workers=1)
        counts[policy] = (len(got.frames), [r.status for r in got.records])
    assert counts["middle"] == (2, ["image", "image"])
    assert counts["all"] == (16, ["image", "image"])
    assert counts["reject"] == (1, ["image", "skipped"])
    allf = ingest(data, Preprocessing(image_size=8, frames="all"), workers=1)
    mid = ingest(data, Preprocessing(image_size=8, frames="middle"), workers=1)
    # ct.dcm first (sorted), then frame 7 of 15. Not bit-equal: resizing one frame and a stack of 15 sums the
    # same float32 terms in a different order (the BLAS kernel and its blocking depend on the batch shape and the
    # CPU), so the two differ by a few ulps (1.5e-7 seen on another machine). Outputs are windowed to [0, 1] and
    # each path's float32 error here is <= 1.6e-7 of the window (measured against float64), so two paths differ
    # by at most ~3.5e-7; 1e-6 is a 1/1,000,000 of the window, far below anything a model sees.
    np.testing.assert_allclose(mid.frames[1], allf.frames[1 + 7], rtol=0, atol=1e-6)


def test_labels_by_path_or_study(tmp_path: Path, small_site: Path) -> None:
    files = sorted(small_site.rglob("*.dcm"))
    by_uid = load_cohort(small_site, small_site / "labels.csv", Preprocessing(image_size=8))
    with open(small_site / "labels.csv") as fh:
        uid_label = {r["SOPInstanceUID"]: r["label"] for r in csv.DictReader(fh)}
    rows = [(f.relative_to(small_site).as_posix(), pydicom.dcmread(f)) for f in files]
    (tmp_path / "path.csv").write_text("path,label\n" + "".join(f"{p},{uid_label[d.SOPInstanceUID]}\n" for p, d in rows))
    study = {d.StudyInstanceUID: uid_label[d.SOPInstanceUID] for _, d in rows}
    (tmp_path / "study.csv").write_text("StudyInstanceUID,label\n" + "".join(f"{k},{v}\n" for k, v in study.items()))
    for name in ("path.csv", "study.csv"):
        c = load_cohort(small_site, tmp_path / name, Preprocessing(image_size=8))
        np.testing.assert_array_equal(c.labels, by_uid.labels)  # labels and patient indices: exact
        np.testing.assert_array_equal(c.patient, by_uid.patient)


def test_window_precedence(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(TEST_FILES / "CT_small.dcm", data / "ct.dcm")
    ds = pydicom.dcmread(data / "ct.dcm")
    hu = np.asarray(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)

    def expect(lo: float, hi: float) -> np.ndarray:
        return np.clip((hu.reshape(16, 8, 16, 8).mean((1, 3)) - lo) / (hi - lo), 0, 1)  # area mean, then window

    site = ingest(data, DataConfig(window=(40.0, 400.0)).preprocessing(16), workers=1).frames[0]
    np.testing.assert_allclose(site, expect(-160, 240), atol=1e-5)
    ds.WindowCenter, ds.WindowWidth = "50", "350"
    ds.save_as(data / "ct.dcm")
    own = ingest(data, Preprocessing(image_size=16), workers=1).frames[0]
    np.testing.assert_allclose(own, expect(50 - 175, 50 + 175), atol=1e-5)
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(data / "ct.dcm")
    minmax = ingest(data, Preprocessing(image_size=16), workers=1).frames[0]
    small = hu.reshape(16, 8, 16, 8).mean((1, 3))
    np.testing.assert_allclose(minmax, expect(float(small.min()), float(small.max())), atol=1e-5)


@pytest.mark.parametrize("bad", [{"frames": "some"}, {"window": (1.0,)}, {"workers": -1}])
def test_bad_data_config_names_the_field(bad: dict[str, object]) -> None:
    from client.config import SiteConfigError

    with pytest.raises(SiteConfigError, match=f"data.{next(iter(bad))}"):
        DataConfig(**bad)  # type: ignore[arg-type]
