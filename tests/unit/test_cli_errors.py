"""Bad input to the CLIs: clear message naming the path, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_workspace


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_simulate_rejects_bad_data_folders(tmp_path: Path, small_site: Path) -> None:
    missing = tmp_path / "no-such-folder"
    r = _run("server.cli", "simulate", "--sites", "1", "--out", str(tmp_path / "run"), "--data", str(missing), cwd=tmp_path)
    assert r.returncode == 2
    assert str(missing) in r.stderr and "point --data at" in r.stderr and "Traceback" not in r.stderr + r.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run("server.cli", "simulate", "--sites", "1", "--out", str(tmp_path / "run2"), "--data", str(empty), cwd=tmp_path)
    assert r.returncode == 2 and "holds no DICOM files" in r.stderr and "Traceback" not in r.stderr

    partial = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(small_site), str(partial)], check=True)
    lines = (partial / "labels.csv").read_text().splitlines()
    (partial / "labels.csv").write_text("\n".join(lines[:5]) + "\n")
    r = _run("server.cli", "simulate", "--sites", "1", "--out", str(tmp_path / "run3"), "--data", str(partial), cwd=tmp_path)
    assert r.returncode == 2 and str(partial / "labels.csv") in r.stderr and "no label for" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_site_synth_and_budget(tmp_path: Path) -> None:
    out = tmp_path / "hospital"
    r = _run("client.cli", "synth", "--out", str(out), "--patients", "5", "--seed", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list(out.rglob("*.dcm"))) >= 10 and (out / "labels.csv").is_file()
    ws = make_workspace(tmp_path, "site-a", out, max_epsilon=5.0)
    r = _run("client.cli", "budget", "--workspace", str(ws), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["epsilon"] == 0.0 and doc["max_epsilon"] == 5.0 and doc["events"] == []
    (ws / "ledger.json").write_text("{broken")
    r = _run("client.cli", "budget", "--workspace", str(ws), cwd=tmp_path)
    assert r.returncode == 2 and "corrupted" in r.stderr and "Traceback" not in r.stderr
