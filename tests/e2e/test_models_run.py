"""Runs with MONAI networks and a multi-label task through Flower's simulation runtime, via the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.models import build_model, get_arrays
from client.synth_radiograph import FINDINGS
from privacy.audit.log import read_entries
from privacy.dp import epsilon
from privacy.egress import EPSILON
from privacy.quantise import quantise
from tests.e2e.test_simulate import simulate
from tests.helpers import site_ledger

pytestmark = pytest.mark.e2e
TINY = ["--patients", "12", "--local-steps", "2", "--batch-size", "4", "--rounds", "2", "--sites", "2"]


def _exact_ledgers(run: Path, final: dict) -> None:
    for site in ("site-1", "site-2"):
        ledger = site_ledger(run / "sites" / site)
        assert [e.round for e in ledger.events if e.kind == "train"] == [1, 2]
        expected = epsilon(ledger.mechanisms(), delta=ledger.events[-1].delta)
        assert final["epsilon"][site] == quantise(EPSILON, expected)  # accounting unchanged and exact


def test_densenet121_at_64_px_on_two_ct_windows_trains_with_dp_and_secure_aggregation(tmp_path: Path) -> None:
    run = tmp_path / "dense"
    m = simulate(*TINY, "--model", "densenet121", "--size", "64", "--window", "-600,1500;40,400", "--out", str(run),
                 cwd=tmp_path)
    assert m["config"]["model"] == "densenet121" and m["config"]["image_size"] == 64
    final = m["rounds"][-1]
    assert final["sites"] == ["site-1", "site-2"] and final["refused"] == []
    _exact_ledgers(run, final)
    with np.load(run / "model-final.npz") as npz:
        fresh = get_arrays(build_model("densenet121", in_channels=2))  # one input channel per window
        assert set(npz.files) == set(fresh) and all(npz[k].shape == fresh[k].shape for k in fresh)
        assert any(not np.array_equal(npz[k], fresh[k]) for k in fresh if fresh[k].dtype.kind == "f")
    start = next(e for e in read_entries(run / "audit.jsonl") if e.event == "run-start")
    assert start.data["model"] == "densenet121" and start.data["init_weights_sha256"] is None


def test_multi_label_radiographs_report_every_finding(tmp_path: Path) -> None:
    run = tmp_path / "dx"
    # 60 patients a site: 12 validation patients each, so every finding (prevalence 0.2-0.4) has both
    # classes at some site (a finding no site can score is null in metrics.json, by design)
    m = simulate(*TINY, "--kind", "radiograph", "--size", "64", "--out", str(run), "--no-secagg",
                 "--local-steps", "6", "--patients", "60", cwd=tmp_path)
    assert m["config"]["findings"] == ",".join(FINDINGS)
    final = m["rounds"][-1]
    per = final["val_auroc_findings"]
    assert list(per) == list(FINDINGS) and all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in per.values())
    # val_auroc: each site's macro AUROC (over the findings it can score), weighted over the sites; it need
    # not equal the mean of the per-finding figures when a site cannot score every finding
    by_site = final["val_auroc_by_site"]
    assert sorted(by_site) == ["site-1", "site-2"]
    assert min(by_site.values()) - 1e-12 <= final["val_auroc"] <= max(by_site.values()) + 1e-12
    _exact_ledgers(run, final)
    report = (run / "report.html").read_text()
    assert all(f"final validation AUROC, {f}" in report for f in FINDINGS)
    header = (run / "sites" / "site-1" / "data" / "labels.csv").read_text().splitlines()[0]
    assert header == "SOPInstanceUID," + ",".join(FINDINGS)


def test_init_weights_start_the_run_and_their_hash_is_audited(tmp_path: Path) -> None:
    import hashlib

    weights = tmp_path / "start.npz"
    arrays = get_arrays(build_model("slicenet", seed=7))
    np.savez(weights, **arrays)
    run = tmp_path / "warm"
    m = simulate(*TINY, "--init-weights", str(weights), "--out", str(run), "--rounds", "1", cwd=tmp_path)
    start = next(e for e in read_entries(run / "audit.jsonl") if e.event == "run-start")
    assert start.data["init_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    from privacy.model_arrays import arrays_sha256

    assert start.data["initial_sha256"] == arrays_sha256(arrays)
    assert m["rounds"][0]["sites"] == ["site-1", "site-2"]
