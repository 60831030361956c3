"""`simulate --privacy-audit` and `medfed-audit attack` end to end: real processes, Flower's
simulation runtime, Opacus DP-SGD, generated DICOM sites with planted canaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.attacks import ATTACKS_DIR
from privacy.attacks.result import attack_result

pytestmark = pytest.mark.e2e


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, cwd=cwd)


def test_privacy_audit_fills_the_report_and_the_site_cli_attacks_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = _run("-m", "server.cli", "simulate", "--sites", "2", "--rounds", "2", "--patients", "16", "--local-steps", "3",
             "--batch-size", "4", "--size", "16", "--val-share", "0.5", "--optimizer", "sgd", "--learning-rate", "0.05",
             "--max-grad-norm", "0.5", "--epsilon", "6", "--privacy-audit", "--canaries", "12", "--out", str(run),
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    result = attack_result(json.loads((run / "attacks.json").read_text())["sites"]["site-1"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert result["run_id"] == metrics["run_id"] and metrics["config"]["optimizer"] == "sgd"
    c = result["canary"]
    assert c["canaries"] == 12 and c["accountant_epsilon"] is not None and 0 < c["accountant_epsilon"] <= 6.0
    assert c["epsilon_lower_bound"] <= c["accountant_epsilon"] and c["within_accountant"]
    assert result["membership"]["loss"]["members"] == 8 and result["membership"]["loss"]["non_members"] == 8
    assert result["inversion"]["dp"]["max_grad_norm"] == 0.5 and result["inversion"]["aggregate"]["sites"] == 5
    assert "canary audit: ε ≥" in r.stderr and "membership (loss): AUROC" in r.stderr
    html = (run / "report.html").read_text()
    section = html[html.index('id="attacks"'):html.index('id="software"')]
    assert "not recorded" not in section and "membership inference ROC" in section and "ε lower bound" in section
    site = run / "sites" / "site-1"
    assert (site / ATTACKS_DIR / f"inversion-{result['run_id']}.png").is_file()
    assert not list(run.glob("*.png"))  # patient images stay in the site's workspace

    # the site attacks the run again with its own command; bad requests get a clear error
    ws = ["--workspace", str(site)]
    refused = _run("-m", "client.audit_cli", "attack", str(run), "--site", "site-1", *ws, cwd=tmp_path)
    assert refused.returncode == 2 and "lies inside the run directory" in refused.stderr  # the server wrote it
    again = _run("-m", "client.audit_cli", "attack", str(run), "--site", "site-1", *ws, "--simulation", "--kind",
                 "canary", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["canary"]["accountant_epsilon"] == c["accountant_epsilon"]
    other = ["--workspace", str(run / "sites" / "site-2"), "--simulation"]
    for args, message in ((["--site", "site-1", *ws, "--simulation", "--kind", "bogus"],
                           "use one of membership, inversion, canary"),
                          (["--site", "site-2", *other, "--kind", "canary"], "no planted canaries"),
                          (["--site", "site-1", *other], "is site 'site-2'"),
                          (["--site", "site-9", "--workspace", str(tmp_path / "nowhere")], "site.toml not found")):
        bad = _run("-m", "client.audit_cli", "attack", str(run), *args, cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
