"""Secure aggregation in a real simulated federation (Flower runtime, Opacus DP on): the
masked aggregate equals the plaintext one, the protocol outcome is in metrics and the
audit log, and sites whose policy requires it refuse an unmasked round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from privacy.audit.log import read_entries

ROOT = Path(__file__).parents[2]
# a site-local seed (deterministic noise, audited as such) makes the two runs' noise equal
COMMON = ["--sites", "3", "--rounds", "2", "--patients", "40", "--local-steps", "5", "--batch-size", "16",
          "--site-seed", "7"]


def _simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", "simulate", *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("secagg")
    masked = _simulate(*COMMON, "--out", str(root / "masked"))
    assert masked.returncode == 0, masked.stderr[-3000:]
    plain = _simulate(*COMMON, "--no-secagg", "--out", str(root / "plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "WARNING: --no-secagg" in plain.stderr
    return root / "masked", root / "plain"


def test_masked_aggregate_equals_the_plaintext_aggregate(runs: tuple[Path, Path]) -> None:
    masked, plain = runs
    # round 1 starts from the same global model: the secure aggregate is the plaintext one
    # within the quantization bound; later rounds start from models that already differ by
    # float32 rounding, which training amplifies a little
    for name, tol in (("checkpoints/round-1.npz", 1e-6), ("checkpoints/round-2.npz", 1e-4), ("model-final.npz", 1e-4)):
        with np.load(masked / name) as a, np.load(plain / name) as b:
            assert a.files == b.files
            worst = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
            assert worst < tol, (name, worst)
    with np.load(masked / "checkpoints/round-1.npz") as one, np.load(masked / "checkpoints/round-2.npz") as two:
        moved = max(float(np.abs(one[k] - two[k]).max()) for k in one.files)
    assert moved > 1e-3  # a real update happened between the rounds, far above the differences


def test_protocol_outcome_in_metrics_and_audit(runs: tuple[Path, Path]) -> None:
    masked, plain = runs
    m = json.loads((masked / "metrics.json").read_text())
    assert m["config"]["secure_aggregation"] is True
    outcome = [{k: v for k, v in r["secagg"].items() if k != "stage_seconds"} for r in m["rounds"]]
    assert outcome == [{"sites": 3, "dropped": 0, "aborted": False, "k": 3, "threshold": 2, "dropped_at": {}}] * 2
    assert all(set(r["secagg"]["stage_seconds"]) == {"advertise", "share", "input", "consistency", "unmask"}
               for r in m["rounds"])
    assert json.loads((plain / "metrics.json").read_text())["config"]["secure_aggregation"] is False
    events = [e for e in read_entries(masked / "audit.jsonl") if e.event == "secure-aggregation"]
    assert [(e.data["round"], e.data["sites"], e.data["aborted"]) for e in events] == [(1, 3, False), (2, 3, False)]
    assert "secure aggregation: off in every round" in (plain / "report.html").read_text()
    html = (masked / "report.html").read_text()
    assert "dropped (recovered)" in html and "Audit logs verified" in html


def test_sites_requiring_secure_aggregation_refuse_an_unmasked_round(runs: tuple[Path, Path], tmp_path: Path) -> None:
    masked, _ = runs
    r = _simulate("--sites", "3", "--rounds", "2", "--local-steps", "5", "--no-secagg",
                  "--sites-dir", str(masked / "sites"), "--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert m["rounds"][0]["refused"] == ["site-1", "site-2", "site-3"] and m["rounds"][0]["sites"] == []
    assert m["ended_early"].startswith("all sites refused round 1")
    refusals = [e for e in read_entries(masked / "sites" / "site-1" / "audit.jsonl") if e.event == "refused"]
    assert refusals and refusals[-1].data["reason"] == "secure-aggregation-required"
