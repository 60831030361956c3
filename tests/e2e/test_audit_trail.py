"""The audit trail of a real simulated run: verify, tamper detection (property test over
random mutations), cross-check, crash-free report in headless Chromium and as PDF, and no
identifying value anywhere in logs, exports or the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pypdf
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from client.config import load_site_config
from client.synth import generate_site, site_profile
from privacy.audit.log import read_entries
from privacy.audit.report import chromium
from privacy.audit.trust import from_roster
from privacy.audit.verify import run_logs, verify_paths
from privacy.keys import load_private_key
from tests.helpers import PLANTED_STRINGS, plant_identifiers, resign_log

ROOT = Path(__file__).parents[2]
SECTIONS = ["Run summary and verdict", "Participants per round", "Training curves", "Privacy",
            "Protection of updates", "Empirical privacy audit", "Software and fingerprints", "Audit logs: final hashes"]


def _cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("audited")
    data = []
    for i in range(2):
        folder = root / f"hospital-{i + 1}"
        generate_site(folder, site_profile(i, patients=40), seed=11)
        data.append(folder)
    plant_identifiers(data[0])
    r = _cli("server.cli", "simulate", "--sites", "2", "--rounds", "2", "--local-steps", "5", "--batch-size", "16",
             "--data", str(data[0]), "--data", str(data[1]), "--out", str(root / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run", r.stdout + r.stderr


def _mini(run_dir: Path, dest: Path) -> Path:
    """Just the logs, metrics and keys of a run (cheap to copy and mutate)."""
    for rel in ["audit.jsonl", "metrics.json", "keys", *[f"sites/{s}/audit.jsonl" for s in ("site-1", "site-2")]]:
        src, dst = run_dir / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dest


def _verdict(run_dir: Path, roster: Path):  # type: ignore[no-untyped-def]
    """Verified with the roster the auditor holds (a copy made before any mutation)."""
    return verify_paths(run_logs(run_dir), from_roster(roster), json.loads((run_dir / "metrics.json").read_text()))


def _fingerprint(output: str) -> str:
    """The roster fingerprint `simulate` printed (what the researcher keeps out of band)."""
    return output.split("--roster-fingerprint ", 1)[1].split()[0]


def test_run_logs_verify(run: tuple[Path, str]) -> None:
    run_dir, output = run
    r = _cli("privacy.audit.cli", "verify", str(run_dir), "--json", "--roster-fingerprint", _fingerprint(output))
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["problems"] == []
    # run-start; per round: round-start, 2 site-replies, secure-aggregation, aggregate, checkpoint and the
    # 2 sites' evaluation replies (with their audit heads), round-end (the signed metrics row); run-end
    assert out["logs"]["server"]["entries"] == 1 + 2 * 9 + 1
    assert out["keys"]["out_of_band"] and out["metrics_checked"] and out["counter_signed_through"] > 0
    # joined + per round: secagg-advertised (one advertisement per round), trained, evaluated
    assert out["logs"]["site-1"]["entries"] == out["logs"]["site-2"]["entries"] == 1 + 2 * 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["audit"]["server_head"] == out["logs"]["server"]["head"]
    server = read_entries(run_dir / "audit.jsonl")
    site = read_entries(run_dir / "sites" / "site-1" / "audit.jsonl")
    starts = {e.data["round"]: e.data["global_sha256"] for e in server if e.event == "round-start"}
    assert {e.data["round"]: e.data["global_sha256"] for e in site if e.event == "round-trained"} == starts
    replies = [e for e in server if e.event == "site-reply" and e.data["site"] == "site-1"]
    assert [r_.data["site_head"] for r_ in replies if r_.data["status"] == "trained"] == [
        e.hash for e in site if e.event == "round-trained"]
    assert [r_.data["site_head"] for r_ in replies if r_.data["status"] == "evaluated"] == [
        e.hash for e in site if e.event == "round-evaluated"]


def test_every_mutation_is_detected(run: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = run
    rng = np.random.default_rng(7)
    logs = ["audit.jsonl", "sites/site-1/audit.jsonl", "sites/site-2/audit.jsonl"]
    kinds = ["flip", "delete", "reorder", "duplicate", "truncate", "foreign-key"]
    detected: dict[str, int] = dict.fromkeys(kinds, 0)
    roster = tmp_path / "pinned-roster.json"
    shutil.copy(run_dir / "keys" / "roster.json", roster)
    for i in range(150):
        mini = _mini(run_dir, tmp_path / f"m{i}")
        path = mini / logs[int(rng.integers(len(logs)))]
        data = path.read_bytes()
        lines = data.splitlines(keepends=True)
        kind = kinds[i % len(kinds)]
        if kind == "flip":
            pos = int(rng.integers(len(data)))
            path.write_bytes(data[:pos] + bytes([data[pos] ^ int(rng.integers(1, 256))]) + data[pos + 1:])
        elif kind == "delete":
            del lines[int(rng.integers(len(lines)))]
            path.write_bytes(b"".join(lines))
        elif kind == "reorder":
            j = int(rng.integers(len(lines) - 1))
            lines[j], lines[j + 1] = lines[j + 1], lines[j]
            path.write_bytes(b"".join(lines))
        elif kind == "duplicate":
            j = int(rng.integers(len(lines)))
            lines.insert(j + 1, lines[j])
            path.write_bytes(b"".join(lines))
        elif kind == "truncate":
            path.write_bytes(data[: int(rng.integers(len(data)))])
        else:
            resign_log(path, read_entries(path), Ed25519PrivateKey.generate())
        verdict = _verdict(mini, roster)
        assert not verdict.ok, (kind, str(path))
        detected[kind] += 1
    assert all(n >= 20 for n in detected.values()), detected
    assert _verdict(_mini(run_dir, tmp_path / "clean"), roster).ok


def test_site_log_that_omits_a_round_fails_precisely(run: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = run
    mini = _mini(run_dir, tmp_path / "omit")  # the site forges its own log: it holds its key
    log = mini / "sites" / "site-2" / "audit.jsonl"
    kept = [e for e in read_entries(log) if not (e.event == "round-trained" and e.data["round"] == 2)]
    resign_log(log, kept, load_private_key(load_site_config(run_dir / "sites" / "site-2").keys_dir / "audit.key"))
    r = _cli("privacy.audit.cli", "verify", str(mini), "--roster", str(run_dir / "keys" / "roster.json"))
    assert r.returncode == 1
    assert f"{log}" in r.stderr and "site site-2 trained round 2" in r.stderr and "no such entry" in r.stderr


def _screenshot(html: Path, png: Path) -> str:
    binary = chromium()
    assert binary is not None, "the report test needs Chromium: apt-get install chromium (.ci/run installs it)"
    r = subprocess.run([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                        "--window-size=1100,1400", f"--screenshot={png}", html.resolve().as_uri()],
                       capture_output=True, text=True, timeout=120)
    return r.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_report_html_renders_and_pdf_has_the_sections(run: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = run
    r = _cli("privacy.audit.cli", "report", str(run_dir), "--out", str(tmp_path / "report.html"), "--pdf",
             "--roster", str(run_dir / "keys" / "roster.json"))
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "report.html").read_text()
    assert all(f">{title}" in html for title in ["Run summary and verdict", "Participants per round", "Training curves"])
    assert "Audit logs verified" in html and "<script" not in html and "http" not in html.replace("http://www.w3.org", "")
    log = _screenshot(tmp_path / "report.html", tmp_path / "report.png")
    assert _console_errors(log) == [], _console_errors(log)
    pixels = np.asarray(Image.open(tmp_path / "report.png").convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and plots, not a blank page
    # the console check sees errors when there are some
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>x</p><script>console.error('boom'); undefinedCall();</script></body></html>")
    assert _console_errors(_screenshot(bad, tmp_path / "bad.png"))
    text = " ".join(p.extract_text() for p in pypdf.PdfReader(tmp_path / "report.pdf").pages)
    assert all(title in text for title in SECTIONS), [t for t in SECTIONS if t not in text]
    assert str(json.loads((run_dir / "metrics.json").read_text())["audit"]["server_head"]) in text.replace("\n", "")


def test_no_identifying_value_in_logs_exports_or_report(run: tuple[Path, str]) -> None:
    run_dir, output = run
    r = _cli("client.cli", "export-audit", "--workspace", str(run_dir / "sites" / "site-1"))
    assert r.returncode == 0, r.stderr
    export = json.loads((run_dir / "sites" / "site-1" / "audit-export.json").read_text())
    assert export["runs"] and export["head"] == read_entries(run_dir / "sites" / "site-1" / "audit.jsonl")[-1].hash
    report = _cli("privacy.audit.cli", "report", str(run_dir), "--pdf", "--roster", str(run_dir / "keys" / "roster.json"))
    assert report.returncode == 0
    pdf_text = " ".join(p.extract_text() for p in pypdf.PdfReader(run_dir / "report.pdf").pages)
    blobs = [output, r.stdout + r.stderr, pdf_text]
    blobs += [p.read_bytes().decode("latin-1") for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".pdf"]
    for value in PLANTED_STRINGS:
        assert not any(value in blob for blob in blobs), value
