"""medfed against the platform a user would pick instead: NVIDIA FLARE 2.9's simulator, on the same
generated sites, model (SliceNet), local work (medfed's own ``train_plain``: the same steps, batch,
learning rate and optimizer), validation of each round's global model at every site, and rounds.

- medfed: ``medfed-server simulate --sites-dir SITES --no-dp --no-secagg`` (privacy off), and once
  per repeat with DP and SecAgg+ on (the privacy cost on top, reported separately);
- FLARE: ``FedAvgJob`` + ``ScriptRunner`` of ``platform_flare/flare_client.py`` (Client API) in
  ``simulator_run`` with one thread per site, as FLARE ships it (torch's default threads) and with
  one torch thread per site (as Ray gives each of medfed's virtual sites one CPU); the faster is the
  peer. FLARE runs in its own venv (``--flare-venv``, made on first use: ``torch==2.13.0`` from this
  disk, ``nvflare==2.9.0`` and this checkout from PyPI); it is never a medfed dependency.

Each side reads the sites' warm medfed cache. Wall time is the whole command (start-up to exit);
rounds 2+ are medfed's per-round seconds and, for FLARE, the time from the first site receiving
round r's model to the first receiving round r+1's (the last round: to the last send). Sides take
turns, ``--repeats`` times; ratios are medians of paired per-repeat ratios. Ends with one JSON line.

    python benchmarks/platforms.py [--repeats 2] [--rounds 3] [--local-steps 50] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
FLARE = "nvflare==2.9.0"


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(tmp / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"}


def flare_venv(path: Path) -> Path:
    """The FLARE venv's python, made on first use."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", FLARE, "-e", str(ROOT)], check=True)
    return python


def medfed(sites: Path, out: Path, args: argparse.Namespace, tmp: Path, *, private: bool) -> dict[str, float]:
    cmd = [sys.executable, "-m", "server.cli", "simulate", "--sites-dir", str(sites), "--rounds", str(args.rounds),
           "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size), "--out", str(out),
           "--learning-rate", str(args.learning_rate)]
    if not private:
        cmd += ["--no-dp", "--no-secagg"]
    started = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=_env(tmp), timeout=3600)
    wall = time.monotonic() - started
    if r.returncode != 0:
        raise SystemExit(f"medfed simulate failed: {r.stderr[-2000:]}")
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    return {"wall": wall, "rounds_2plus": statistics.mean(r["seconds"] for r in rows[1:]), "round1": rows[0]["seconds"],
            "val_auroc": rows[-1]["val_auroc"]}


def flare(python: Path, sites: list[Path], work: Path, args: argparse.Namespace, tmp: Path,
          threads: int) -> dict[str, float]:
    work.mkdir(parents=True)
    cmd = [str(python), str(HERE / "platform_flare" / "flare_job.py"), "--workspaces", *map(str, sites),
           "--rounds", str(args.rounds), "--steps", str(args.local_steps), "--batch-size", str(args.batch_size),
           "--learning-rate", str(args.learning_rate), "--work", str(work), "--torch-threads", str(threads)]
    started = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=_env(tmp), timeout=3600)
    wall = time.monotonic() - started
    if r.returncode != 0:
        raise SystemExit(f"FLARE simulator failed: {(r.stdout + r.stderr)[-2000:]}")
    marks = [json.loads(line) for line in (work / "times.jsonl").read_text().splitlines()]
    rounds = sorted({m["round"] for m in marks})
    if len(rounds) != args.rounds:
        raise SystemExit(f"FLARE ran {len(rounds)} rounds, not {args.rounds}")
    start = {r: min(m["t"] for m in marks if m["round"] == r and m["event"] == "receive") for r in rounds}
    end = {r: start[r + 1] if r + 1 in start else max(m["t"] for m in marks if m["round"] == r and m["event"] == "send")
           for r in rounds}
    seconds = [end[r] - start[r] for r in rounds]
    return {"wall": wall, "rounds_2plus": statistics.mean(seconds[1:]), "round1": seconds[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--learning-rate", type=float, default=0.002)
    ap.add_argument("--no-privacy-run", action="store_true", help="skip the DP + SecAgg+ medfed run")
    ap.add_argument("--flare-venv", type=Path, default=Path.home() / ".cache" / "medfed-bench" / "flare-venv")
    args = ap.parse_args()
    python = flare_venv(args.flare_venv)
    results: dict[str, list[dict[str, float]]] = {"medfed": [], "flare": [], "flare_1thread": [], "medfed_private": []}
    with tempfile.TemporaryDirectory(prefix="medfed-platform-") as name:
        tmp = Path(name)
        setup = tmp / "setup"  # the generated sites and their warm caches, shared by every run
        r = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--sites", str(args.sites), "--rounds", "1",
                            "--no-dp", "--no-secagg", "--local-steps", "1", "--out", str(setup)],
                           capture_output=True, text=True, cwd=tmp, env=_env(tmp), timeout=3600)
        if r.returncode != 0:
            raise SystemExit(f"generating the sites failed: {r.stderr[-2000:]}")
        sites = sorted((setup / "sites").iterdir())
        for i in range(args.repeats):
            order = ["medfed", "flare", "flare_1thread"] if i % 2 == 0 else ["flare_1thread", "flare", "medfed"]
            for side in order:
                if side == "medfed":
                    res = medfed(setup / "sites", tmp / f"medfed-{i}", args, tmp, private=False)
                else:
                    res = flare(python, sites, tmp / f"{side}-{i}", args, tmp, threads=1 if side == "flare_1thread" else 0)
                results[side].append(res)
                print(f"repeat {i + 1} {side}: wall {res['wall']:.1f} s, round 1 {res['round1']:.1f} s, rounds 2+ "
                      f"{res['rounds_2plus']:.2f} s", flush=True)
            if not args.no_privacy_run:  # fresh copies of the sites: each private run starts with a full budget
                fresh = tmp / f"private-sites-{i}"
                shutil.copytree(setup / "sites", fresh)
                res = medfed(fresh, tmp / f"medfed-private-{i}", args, tmp, private=True)
                results["medfed_private"].append(res)
                print(f"repeat {i + 1} medfed DP+SecAgg+: wall {res['wall']:.1f} s, rounds 2+ {res['rounds_2plus']:.2f} s",
                      flush=True)
    summary: dict[str, object] = {}
    for key in ("wall", "rounds_2plus"):
        peers = [min(a[key], b[key]) for a, b in zip(results["flare"], results["flare_1thread"], strict=True)]
        summary[f"{key}_vs_flare"] = statistics.median(m[key] / p for m, p in zip(results["medfed"], peers, strict=True))
        if results["medfed_private"]:
            summary[f"{key}_privacy_cost"] = statistics.median(
                p[key] / m[key] for p, m in zip(results["medfed_private"], results["medfed"], strict=True))
    print(f"medfed / FLARE (faster variant), privacy off: wall {summary['wall_vs_flare']:.3f}, rounds 2+ "
          f"{summary['rounds_2plus_vs_flare']:.3f} (target <= 1.0 both)")
    print(json.dumps({"benchmark": "platform", "flare": FLARE, "cpus": os.cpu_count(), "config": vars(args) | {
        "flare_venv": str(args.flare_venv)}, "results": results, "summary": summary}))


if __name__ == "__main__":
    main()
