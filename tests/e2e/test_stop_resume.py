"""A run stopped by the operator (SIGINT/SIGTERM) or killed (a crash) continues with --resume: real
processes (the CLI, Flower's simulation runtime), real DP ledgers, the real verifier."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privacy.audit.log import read_entries
from privacy.dp import epsilon
from privacy.egress import EPSILON
from privacy.quantise import quantise
from server.rundir import load_npz
from tests.helpers import site_ledger

pytestmark = pytest.mark.e2e
SITES = ("site-1", "site-2")
RUN = ["--sites", "2", "--patients", "12", "--local-steps", "30", "--batch-size", "4", "--rounds", "3"]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(tmp / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"}


def _children(pid: int) -> list[int]:
    """Children of ``pid`` that lead their own process group (Linux /proc): the simulation runtime
    the CLI supervises (multiprocessing's helper processes stay in the CLI's group)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(stat.parent.name)
        if int(fields[1]) == pid and int(fields[2]) == child:
            out.append(child)
    return out


def _start(run: Path, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "server.cli", "simulate", *RUN, "--out", str(run)], cwd=tmp,
                            env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_round(run: Path, proc: subprocess.Popen, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run / "metrics.json"
        if metrics.is_file() and len(json.loads(metrics.read_text()).get("rounds", [])) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        time.sleep(0.3)
    raise AssertionError(f"round {n} did not end within {timeout:.0f}s")


def _kill_session(proc: subprocess.Popen) -> None:
    """Stop what the test started, on success and failure: the CLI's session and its runtime's."""
    for pid in [*_children(proc.pid), proc.pid]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=30)


def _cli(module: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp, env=_env(tmp), capture_output=True,
                          text=True, timeout=900)


def _verify(run: Path, tmp: Path) -> dict:
    fingerprint = json.loads((run / "simulation.json").read_text())["roster_fingerprint"]
    r = _cli("privacy.audit.cli", "verify", str(run), "--json", "--roster-fingerprint", fingerprint, tmp=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout)


def _check_resumed_run(run: Path, tmp: Path) -> None:
    """After --resume: every round number started once; the rows are the ended rounds; the final
    model is the last applied round's; each site's ε is the composition of what it released."""
    r = _cli("server.cli", "simulate", "--resume", str(run), tmp=tmp)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((run / "metrics.json").read_text())
    entries = [e for e in read_entries(run / "audit.jsonl") if e.data.get("run_id") == m["run_id"]]
    starts = [e.data["round"] for e in entries if e.event == "round-start"]
    assert starts == sorted(set(starts)) and starts[-1] == 3  # no round number twice, the run reached its last
    ended = [e.data["round"] for e in entries if e.event == "round-end"]
    assert [row["round"] for row in m["rounds"]] == ended
    assert [e.event for e in entries].count("run-end") == 1 and entries[-1].event == "run-end"
    resumed = [e for e in entries if e.event == "run-resumed"]
    assert len(resumed) == 1 and m["resumed"] == [{"next_round": resumed[0].data["next_round"],
                                                   "abandoned": resumed[0].data["abandoned"]}]
    applied = [e.data["round"] for e in entries if e.event == "aggregate-applied"]
    final = load_npz(run / "model-final.npz")
    from privacy.model_arrays import arrays_sha256

    assert arrays_sha256(final) == m["final_model_sha256"] == m["rounds"][-1]["model_sha256"]
    assert json.loads((run / "model-final.json").read_text())["round"] == applied[-1] == 3
    for site in SITES:
        ledger = site_ledger(run / "sites" / site)
        trained = [e.round for e in ledger.events if e.kind == "train"]
        assert set(applied) <= set(trained) <= set(starts)  # every update that left is counted, once
        assert len(trained) == len(set(trained))
        assert m["rounds"][-1]["epsilon"][site] == quantise(EPSILON, epsilon(ledger.mechanisms(),
                                                                              delta=ledger.events[-1].delta))
    verdict = _verify(run, tmp)
    assert verdict["ok"] is True and verdict["metrics_checked"] is True
    again = _cli("server.cli", "simulate", "--resume", str(run), tmp=tmp)  # a finished run is not resumed
    assert again.returncode == 2 and "finished" in again.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_cleanly_and_resume_finishes_it(tmp_path: Path, sig: signal.Signals) -> None:
    run = tmp_path / "run"
    proc = _start(run, tmp_path)
    try:
        _wait_for_round(run, proc, 1)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)  # stops within the exchange's poll, not at the round's end
    finally:
        _kill_session(proc)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"stopped by {sig.name}" in err and f"simulate --resume {run}" in err
    m = json.loads((run / "metrics.json").read_text())
    after = m["stopped"]["after_round"]
    assert m["stopped"]["reason"] == sig.name and after == m["rounds"][-1]["round"] >= 1
    assert json.loads((run / "model-final.json").read_text())["round"] == after
    assert m["final_model_sha256"] == m["rounds"][-1]["model_sha256"]
    stopped = [e for e in read_entries(run / "audit.jsonl") if e.event == "run-stopped"]
    assert len(stopped) == 1 and stopped[0].data["reason"] == sig.name and stopped[0].data["round"] == after
    assert _verify(run, tmp_path)["ok"] is True  # a stopped run verifies: its log says it stopped
    _check_resumed_run(run, tmp_path)


def test_a_killed_server_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(run, tmp_path)
    try:
        _wait_for_round(run, proc, 1)
        deadline = time.monotonic() + 120
        while not any(e.event == "round-start" and e.data["round"] == 2 for e in read_entries(run / "audit.jsonl")):
            assert time.monotonic() < deadline, "round 2 did not start"
            time.sleep(0.05)
        runtime = _children(proc.pid)
        assert runtime, "the CLI runs the simulation runtime in a child process"
        for pid in runtime:
            os.killpg(pid, signal.SIGKILL)  # the server dies in round 2, with its runtime and sites
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_session(proc)
    assert proc.returncode == 1 and f"simulate --resume {run}" in err
    m = json.loads((run / "metrics.json").read_text())
    assert "stopped" not in m and [r["round"] for r in m["rounds"]] == [1]
    # a checkpoint that no longer hashes to what the log signed is refused, not trained on
    bad = tmp_path / "tampered"
    shutil.copytree(run, bad)
    shutil.copytree(run.with_name("run.keys"), bad.with_name("tampered.keys"))
    meta = json.loads((bad / "simulation.json").read_text())
    meta["workspaces"] = [str(Path(w.replace(str(run), str(bad)))) for w in meta["workspaces"]]
    (bad / "simulation.json").write_text(json.dumps(meta))
    cfg = json.loads((bad / "metrics.json").read_text())
    cfg["config"] = {**cfg["config"], "run_dir": str(bad), "audit_key": cfg["config"]["audit_key"].replace(
        "run.keys", "tampered.keys"), "roster_file": str(bad / "keys" / "roster.json")}
    (bad / "metrics.json").write_text(json.dumps(cfg))
    ckpt = bad / "checkpoints" / "round-1.npz"
    arrays = load_npz(ckpt)
    first = next(iter(arrays))
    arrays[first] = arrays[first] + 1.0
    import numpy as np

    np.savez(ckpt, **arrays)
    sidecar = json.loads(ckpt.with_suffix(".json").read_text())
    import hashlib

    sidecar["sha256"] = hashlib.sha256(ckpt.read_bytes()).hexdigest()  # a consistent forgery of file and sidecar
    ckpt.with_suffix(".json").write_text(json.dumps(sidecar))
    r = _cli("server.cli", "simulate", "--resume", str(bad), tmp=tmp_path)
    assert r.returncode == 4 and "does not hash to what the server's log signed" in r.stderr
    _check_resumed_run(run, tmp_path)
