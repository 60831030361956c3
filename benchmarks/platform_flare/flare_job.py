"""Build and run the NVIDIA FLARE 2.9 FedAvg job of ``benchmarks/platforms.py`` in FLARE's simulator
(one client per site, all at once). Runs inside the benchmark's FLARE venv; prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nvflare.app_opt.pt.job_config.fed_avg import FedAvgJob
from nvflare.job_config.script_runner import ScriptRunner

from client.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspaces", required=True, nargs="+")
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--learning-rate", type=float, required=True)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--work", required=True)
    ap.add_argument("--torch-threads", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    times = work / "times.jsonl"
    names = [f"site-{i + 1}" for i in range(len(args.workspaces))]
    pairs = ",".join(f"{n}={w}" for n, w in zip(names, args.workspaces, strict=True))
    job = FedAvgJob(initial_model=build_model(), n_clients=len(names), num_rounds=args.rounds, name="medfed-bench",
                    key_metric="val_auroc")
    runner = ScriptRunner(script=str(Path(__file__).with_name("flare_client.py")),
                          script_args=f"--workspaces {pairs} --steps {args.steps} --batch-size {args.batch_size} "
                                      f"--learning-rate {args.learning_rate} --optimizer {args.optimizer} "
                                      f"--times {times} --torch-threads {args.torch_threads}")
    for name in names:
        job.to(runner, name)
    started = time.monotonic()
    job.simulator_run(str(work / "workspace"), threads=len(names))
    wall = time.monotonic() - started
    print(json.dumps({"wall_seconds": wall, "times": str(times)}))


if __name__ == "__main__":
    main()
