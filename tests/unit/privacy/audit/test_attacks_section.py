"""The report's "Empirical privacy audit" section: a site's attack result as a table and an ROC
chart, re-checked against the closed schema; absent, malformed or of another run: said so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from privacy.attacks.canary import CanaryAudit
from privacy.attacks.roc import separation
from privacy.audit.report import ReportData, attacks_section
from privacy.audit.verify import Verdict


def _result(run_id: str) -> dict:
    rng = np.random.default_rng(0)
    sep = separation(rng.normal(0.3, 1, 50), rng.normal(0, 1, 50)).as_dict()
    canary = CanaryAudit(canaries=100, included=51, guesses=50, correct=41, epsilon_lower_bound=0.88, confidence=0.95,
                         delta=1e-5).as_dict()
    return {"site": "site-1", "run_id": run_id, "model_sha256": "ab" * 32, "utility": {"val_auroc": 0.61, "val_loss": 0.69},
            "membership": {"loss": sep, "calibrated": sep, "reference_models": 4},
            "inversion": {"plain": {"ssim": 0.21, "psnr": 10.0, "batch_size": 1},
                          "dp": {"ssim": 0.01, "psnr": 8.7, "batch_size": 1, "noise_multiplier": 1.2,
                                 "max_grad_norm": 1.0},
                          "aggregate": {"ssim": 0.05, "psnr": 10.7, "batch_size": 1, "sites": 5},
                          "iterations": 400, "image_size": 32},
            "canary": {**canary, "accountant_epsilon": 7.9, "within_accountant": True}}


def _section(tmp_path: Path, doc: object | None) -> tuple[str, list]:
    if doc is not None:
        (tmp_path / "attacks.json").write_text(json.dumps(doc))
    sec = attacks_section(ReportData(tmp_path, {"run_id": "r1"}, Verdict(ok=True, chains={}, problems=[], trust=""), []))
    texts = " ".join(str(b.get("text", "")) for b in sec.blocks)
    return texts, sec.blocks


def test_a_sites_result_becomes_a_table_and_a_roc_chart(tmp_path: Path) -> None:
    texts, blocks = _section(tmp_path, {"sites": {"site-1": _result("r1")}})
    table = next(b for b in blocks if b["kind"] == "table")
    cells = {(row[0], row[1]): row[2] for row in table["rows"]}
    assert cells[("membership (loss)", "members / non-members")] == "50 / 50"
    assert cells[("inversion (dp)", "SSIM / PSNR (dB)")] == "0.010 / 8.7"
    assert cells[("canary audit", "ε lower bound (95%)")] == "0.880"
    assert cells[("canary audit", "accountant's ε")] == "7.900"
    assert any(b["kind"] == "svg" and "membership inference ROC" in str(b["svg"]) for b in blocks)
    assert "validation AUROC of that model: 0.610" in texts and "never leaves" in texts


def test_absent_malformed_or_foreign_results_are_not_shown(tmp_path: Path) -> None:
    assert _section(tmp_path, None)[0] == "not recorded"
    bad = _result("r1")
    bad["membership"]["loss"]["auroc"] = "4821397"
    assert "does not fit the attack result schema" in _section(tmp_path, {"sites": {"site-1": bad}})[0]
    texts, blocks = _section(tmp_path, {"sites": {"site-1": _result("other-run")}})
    assert "not of this run" in texts and not any(b["kind"] == "table" for b in blocks)
