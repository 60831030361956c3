"""How the simulation scales with the number of sites: ``medfed-server simulate`` at 10, 50 and 100
small generated sites (DP and SecAgg+ on, as by default), in Flower's simulation runtime on this
machine's cores.

Per run: seconds per round (round 1 includes the runtime's start-up; the figure is the mean of
rounds 2..R), seconds per site per round, each SecAgg+ stage's wall seconds, the neighbourhood k and
threshold, and the peak memory of the whole process tree (the CLI, the runtime, Ray and its workers;
summed RSS sampled every 0.5 s from /proc). Then the protocol's own per-site cost at the same n (CPU
seconds and bytes per site for every stage in one process, ``benchmarks/secagg.py``'s part 2):
flat in n above the complete graph's 64 sites, where k stops growing.

    python benchmarks/scale.py [--sites 10 50 100] [--rounds 3] [--patients 8]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Summed resident memory (bytes) of ``root`` and every process descending from it (/proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            pid = int(stat.parent.name)
            parents[pid], rss[pid] = int(fields[1]), int(fields[21]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(kids)
        frontier += kids
    return sum(rss.get(p, 0) for p in tree)


def run(n: int, rounds: int, patients: int, tmp: Path) -> dict[str, object]:
    out = tmp / f"sites-{n}"
    env = {**os.environ, "FLWR_HOME": str(tmp / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
    cmd = [sys.executable, "-m", "server.cli", "simulate", "--sites", str(n), "--rounds", str(rounds),
           "--patients", str(patients), "--local-steps", "5", "--batch-size", "4", "--out", str(out)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tmp, start_new_session=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = proc.communicate(timeout=3600)
    sampler.join()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"simulate --sites {n} failed ({proc.returncode}): {stderr[-2000:]}")
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    later = rows[1:] or rows
    per_round = sum(r["seconds"] for r in later) / len(later)
    stages = {s: round(sum(r["secagg"]["stage_seconds"][s] for r in later) / len(later), 3)
              for s in later[0]["secagg"]["stage_seconds"]}
    return {"sites": n, "wall_seconds": round(wall, 1), "round1_seconds": rows[0]["seconds"],
            "seconds_per_round": round(per_round, 3), "seconds_per_site_round": round(per_round / n, 4),
            "stage_seconds": stages, "k": later[0]["secagg"]["k"], "threshold": later[0]["secagg"]["threshold"],
            "applied_sites": [len(r["sites"]) for r in rows], "peak_rss_mib": round(peak[0] / 2**20)}


def main() -> None:
    from secagg import protocol_cost

    from server.config import RunConfig
    from server.initial_model import initial_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--patients", type=int, default=8)
    args = ap.parse_args()
    dim = sum(int(v.size) for v in initial_model(RunConfig())[0].values())
    results = []
    with tempfile.TemporaryDirectory(prefix="medfed-scale-") as tmp:
        for n in args.sites:
            sim = run(n, args.rounds, args.patients, Path(tmp))
            sim["protocol_per_site"] = protocol_cost(n, dim)
            results.append(sim)
            print(f"{n:4d} sites: {sim['seconds_per_round']:.2f} s/round ({sim['seconds_per_site_round']:.3f} "
                  f"s/site), round 1 {sim['round1_seconds']:.1f} s, k={sim['k']} t={sim['threshold']}, "
                  f"peak {sim['peak_rss_mib']} MiB; stages {sim['stage_seconds']}; protocol per site "
                  f"{sim['protocol_per_site']}", flush=True)
    print(json.dumps({"benchmark": "scale", "cpus": os.cpu_count(), "update_values": dim, "runs": results}))


if __name__ == "__main__":
    main()
