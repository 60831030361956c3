"""One of five sites poisons its update (x100) in Flower's simulation runtime: norm bounding and a robust
aggregator keep the model within 0.05 AUROC of the clean run; the plain mean does not; under secure
aggregation the poisoned aggregate is rejected and never applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privacy.audit.log import read_entries
from privacy.audit.trust import from_roster
from privacy.audit.verify import run_logs, verify_paths
from tests.e2e.test_simulate import simulate

pytestmark = pytest.mark.e2e
COMMON = ["--sites", "5", "--rounds", "3", "--local-steps", "20", "--batch-size", "16", "--no-dp"]


def test_one_poisoned_site_of_five(tmp_path: Path) -> None:
    clean = simulate(*COMMON, "--patients", "40", "--no-secagg", "--out", str(tmp_path / "clean"), cwd=tmp_path)
    sites = str(tmp_path / "clean" / "sites")
    auroc = clean["rounds"][-1]["val_auroc"]
    assert auroc >= 0.9

    def poisoned(name: str, *extra: str) -> dict:
        return simulate(*COMMON, "--sites-dir", sites, "--poison", "site-2:scale=100", *extra,
                        "--out", str(tmp_path / name), cwd=tmp_path)

    plain = poisoned("mean", "--no-secagg")
    norms = plain["rounds"][-1]["update_norms"]
    assert norms["site-2"] > 20 * max(v for k, v in norms.items() if k != "site-2")  # the poison is in the clear
    assert plain["rounds"][-1]["val_auroc"] < auroc - 0.2  # the plain mean follows the poisoner
    bounded = poisoned("bound", "--no-secagg", "--update-norm-bound", "2")
    assert bounded["rounds"][-1]["clipped"] == ["site-2"]
    assert abs(bounded["rounds"][-1]["val_auroc"] - auroc) <= 0.05
    median = poisoned("median", "--no-secagg", "--aggregator", "median")
    assert abs(median["rounds"][-1]["val_auroc"] - auroc) <= 0.05
    secure = poisoned("secure", "--update-norm-bound", "2")  # secure aggregation on: only the mean is seen
    assert all(r["rejected"].startswith("aggregate norm") for r in secure["rounds"])
    first = secure["rounds"][0]["model_sha256"]
    assert all(r["model_sha256"] == first for r in secure["rounds"])  # never applied
    log = read_entries(tmp_path / "secure" / "audit.jsonl")
    assert [e.data["round"] for e in log if e.event == "aggregate-rejected"] == [1, 2, 3]
    assert not [e for e in log if e.event == "aggregate-applied"]
    for name in ("bound", "secure"):  # the defended and the rejected runs verify, site logs included
        run = tmp_path / name
        logs = run_logs(run) | {k: v for k, v in run_logs(tmp_path / "clean").items() if k != "server"}  # --sites-dir
        verdict = verify_paths(logs, from_roster(run / "keys" / "roster.json"),
                               json.loads((run / "metrics.json").read_text()))
        assert verdict.ok, verdict.problems[:3]
