"""Round time of a real loopback deployment (SuperLink, 3 SuperNodes, TLS, secure aggregation,
DP): this tree against another git ref, side by side, runs alternating.

Each run is ``examples/deployment/loopback.sh`` (server, three generated hospitals, a 2-round
run). The other ref is checked out in a temporary git worktree and run with the same
interpreter and packages (its code first on PYTHONPATH). Ends with one JSON line.

    python benchmarks/deployment.py [--ref 7c8eb23] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(tree: Path, out: Path) -> list[float]:
    env = dict(os.environ, PORT=str(_port()), PYTHONPATH=str(tree), FLWR_TELEMETRY_ENABLED="0")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    r = subprocess.run(["bash", str(tree / "examples" / "deployment" / "loopback.sh"), str(out)], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"loopback run in {tree} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return [float(row["seconds"]) for row in json.loads((out / "run" / "metrics.json").read_text())["rounds"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="7c8eb23", help="the git ref to compare with (default: before code approval)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {"this": [], "ref": []}
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        other = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "-q", str(other), args.ref], check=True)
        try:
            for i in range(args.repeats):
                for name, tree in (("ref", other), ("this", ROOT)):
                    rounds = _run(tree, Path(tmp) / f"{name}-{i}")
                    seconds[name].extend(rounds)
                    print(f"{name:<5} run {i + 1}: seconds per round {rounds}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)
    this, ref = statistics.median(seconds["this"]), statistics.median(seconds["ref"])
    print(f"median s/round: this tree {this:.1f}, {args.ref} {ref:.1f}, ratio {this / ref:.3f}")
    print(json.dumps({"benchmark": "deployment", "ratios": {"round_vs_ref": round(this / ref, 4)}, "targets": {},
                      "pass": True, "seconds_per_round": seconds, "ref": args.ref}))


if __name__ == "__main__":
    main()
