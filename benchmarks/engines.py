"""End-to-end cost of standing on the engines' public APIs: this tree against an earlier one.

Issue 19 retired the rewrites of engine internals (a hand-written native pixel decoder, a
replaced Conv2d ``forward`` that skipped autograd's summed weight gradient, a wrapped Opacus
``_close``). This script measures what that costs end to end, side by side in one run:

- ``simulate``: ``medfed-server simulate --sites 3 --rounds 3`` wall time, the two trees taking
  turns (``--repeats`` pairs; the ratio is the median of the pairs' after/before);
- ``ingest``: ``benchmarks/ingest.py --json`` of each tree (ratios to raw pydicom measured
  inside each run, so the machine's drift between the two runs cancels).

The earlier tree is checked out with ``git worktree`` into a temporary folder and run with
``PYTHONPATH`` pointing at it (the same interpreter and packages). Ends with one JSON line.

    python benchmarks/engines.py --before REV [--repeats 2] [--patients 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_SIMULATE = 1.10  # after / before wall time: at most 10% slower


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "FLWR_TELEMETRY_ENABLED": "0"}


def simulate_seconds(tree: Path, work: Path) -> float:
    out = work / f"run-{time.monotonic_ns()}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--sites", "3", "--rounds", "3", "--out", str(out),
                    "--json"], check=True, capture_output=True, cwd=work, env=_env(tree), timeout=3600)
    return time.perf_counter() - start


def ingest_ratios(tree: Path, patients: int, repeats: int) -> dict[str, float]:
    r = subprocess.run([sys.executable, str(tree / "benchmarks" / "ingest.py"), "--json", "--patients", str(patients),
                        "--repeats", str(repeats)], check=True, capture_output=True, text=True, cwd=tree,
                       env=_env(tree), timeout=3600)
    return json.loads(r.stdout.strip().splitlines()[-1])["ratios"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier commit (git rev)")
    parser.add_argument("--repeats", type=int, default=2, help="simulate pairs")
    parser.add_argument("--patients", type=int, default=150, help="ingest corpus size (benchmarks/ingest.py)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medfed-engines-") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], check=True, cwd=ROOT,
                       capture_output=True)
        try:
            work = Path(tmp) / "work"
            work.mkdir()
            pairs = []
            for i in range(args.repeats):  # alternate which tree goes first
                order = [("before", before), ("after", ROOT)] if i % 2 == 0 else [("after", ROOT), ("before", before)]
                t = {name: simulate_seconds(tree, work) for name, tree in order}
                pairs.append(t)
                print(f"simulate pair {i + 1}: before {t['before']:.1f} s, after {t['after']:.1f} s", flush=True)
            ingest = {name: ingest_ratios(tree, args.patients, 3) for name, tree in (("before", before), ("after", ROOT))}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    ratio = statistics.median(p["after"] / p["before"] for p in pairs)
    for name in ("before", "after"):
        print(f"ingest {name}: " + ", ".join(f"{k} {v:.2f}x raw" for k, v in ingest[name].items()))
    print(f"simulate 3 sites x 3 rounds: after/before {ratio:.3f} (target <= {TARGET_SIMULATE})")
    print(json.dumps({"benchmark": "engines", "before": args.before,
                      "ratios": {"simulate_after_vs_before": round(ratio, 3)},
                      "simulate_seconds": pairs, "ingest_vs_raw": ingest,
                      "targets": {"simulate <= 1.10x before": ratio <= TARGET_SIMULATE,
                                  "ingest first_2 >= 1.0x raw": ingest["after"].get("first_2", 0) >= 1.0}}))


if __name__ == "__main__":
    main()
