"""End to end through Flower's real simulation runtime (Ray), via the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from privacy.dp import epsilon
from privacy.egress import EPSILON
from privacy.quantise import quantise
from tests.helpers import shared_with_others, site_ledger

pytestmark = pytest.mark.e2e


def simulate(*args: str, cwd: Path) -> dict:
    out = Path(args[args.index("--out") + 1])
    r = subprocess.run([sys.executable, "-m", "server.cli", "simulate", *args], capture_output=True,
                       text=True, timeout=1500, cwd=cwd)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def test_default_simulation_learns_with_dp_and_keeps_the_contract(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    m = simulate("--sites", "3", "--rounds", "3", "--out", str(run), cwd=tmp_path)
    rounds = m["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert r["sites"] == ["site-1", "site-2", "site-3"] and r["refused"] == []
        for key in ("train_loss", "val_loss", "val_auroc", "seconds"):
            assert isinstance(r[key], float)
        assert set(r["epsilon"]) == {"site-1", "site-2", "site-3"}
    assert rounds[2]["val_auroc"] > rounds[0]["val_auroc"]
    assert rounds[2]["val_auroc"] >= 0.75
    assert m["config"]["num_server_rounds"] == 3 and m["config"]["dp"] is True
    # checkpoints and final model, each with a sidecar naming its round and hash
    for rnd in (1, 2, 3):
        side = json.loads((run / "checkpoints" / f"round-{rnd}.json").read_text())
        assert side["round"] == rnd and len(side["sha256"]) == 64
    final = json.loads((run / "model-final.json").read_text())
    assert final["round"] == 3 and final["arrays_sha256"] == m["final_model_sha256"]
    # every site accounted every round, stayed within its budget and reported it
    for site in ("site-1", "site-2", "site-3"):
        ledger = site_ledger(run / "sites" / site)
        assert [e.round for e in ledger.events] == [1, 2, 3]
        eps = ledger.epsilon(delta=ledger.events[-1].delta)
        assert eps <= 8.0 and eps > 7.0  # the plan uses the budget it was given, no more
        assert rounds[2]["epsilon"][site] == quantise(EPSILON, eps)  # as it left the site: 4 digits, rounded up
        assert all(e.noise_multiplier > 0.3 for e in ledger.events)
    assert shared_with_others(run) == []  # the virtual sites' keys, caches, ledgers and logs are 0600/0700


def test_restart_continues_the_ledger_and_exhausted_budgets_are_refused(tmp_path: Path) -> None:
    first = tmp_path / "first"
    common = ["--patients", "30", "--local-steps", "5", "--batch-size", "8"]
    # the server asks for more noise than the sites need: they spend only part of ε = 3
    simulate("--sites", "2", "--rounds", "2", "--out", str(first), "--epsilon", "3",
             "--noise-multiplier", "6", *common, cwd=tmp_path)
    sites = first / "sites"
    spent = {s.name: site_ledger(s) for s in sorted(sites.iterdir())}
    for ledger in spent.values():
        assert len(ledger.events) == 2 and ledger.events[0].noise_multiplier == pytest.approx(6.0)
        assert ledger.epsilon(delta=ledger.events[-1].delta) < 3.0

    # a new run at the same hospitals (new processes) continues from the ledgers, not from zero
    second = tmp_path / "second"
    m = simulate("--sites", "2", "--rounds", "2", "--out", str(second), "--sites-dir", str(sites),
                 *common, cwd=tmp_path)
    for name in spent:
        ledger = site_ledger(sites / name)
        assert [e.round for e in ledger.events] == [1, 2, 1, 2]
        assert len({e.run_id for e in ledger.events}) == 2
        delta = ledger.events[-1].delta
        expected = epsilon(ledger.mechanisms(), delta=delta)
        assert m["rounds"][-1]["epsilon"][name] == quantise(EPSILON, expected)  # as it left the site
        assert expected <= 3.0 and expected > 2.9  # the second run spent exactly what remained

    # a third run finds no budget: every site refuses, ε never exceeds 3, the run ends cleanly
    third = tmp_path / "third"
    m = simulate("--sites", "2", "--rounds", "2", "--out", str(third), "--sites-dir", str(sites),
                 *common, cwd=tmp_path)
    assert m["rounds"][0]["refused"] == sorted(spent) and m["rounds"][0]["sites"] == []
    assert "all sites refused" in m["ended_early"]
    for name in spent:
        ledger = site_ledger(sites / name)
        assert len(ledger.events) == 4  # nothing trained, nothing recorded
        assert ledger.epsilon(delta=ledger.events[-1].delta) <= 3.0


def test_dp_utility_is_close_to_non_private(tmp_path: Path) -> None:
    dp = simulate("--sites", "3", "--rounds", "5", "--epsilon", "8", "--out", str(tmp_path / "dp"), cwd=tmp_path)
    same_data = [arg for i in (1, 2, 3) for arg in ("--data", str(tmp_path / "dp" / "sites" / f"site-{i}" / "data"))]
    plain = simulate("--sites", "3", "--rounds", "5", "--no-dp", "--out", str(tmp_path / "plain"), *same_data, cwd=tmp_path)
    auroc_dp, auroc_plain = dp["rounds"][-1]["val_auroc"], plain["rounds"][-1]["val_auroc"]
    print(f"5 rounds: AUROC with DP (ε=8) {auroc_dp:.4f}, without DP {auroc_plain:.4f}")
    assert auroc_plain - auroc_dp <= 0.08
    assert max(dp["rounds"][-1]["epsilon"].values()) <= 8.0
    assert plain["rounds"][-1]["epsilon"] == {} and plain["config"]["dp"] is False
