"""medfed's round time without privacy vs a plain Flower FedAvg round (Message API FedAvg.start).

Same model, same sites, same local steps, same simulation runtime; each side runs in its
own child process (one process tree), one after the other. Ends with one JSON line.

    python benchmarks/round_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.10  # medfed (no privacy) may cost at most 10 % more per round than plain FedAvg


def _flower_child(sites_dir: Path, rounds: int, steps: int, batch: int) -> float:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from client.config import load_site_config
    from client.models import build_model, pick_device
    from client.site import load_site_data
    from client.train import LocalPlan, evaluate, train_plain

    workspaces = sorted(p for p in sites_dir.iterdir() if (p / "site.toml").is_file())
    client_app = ClientApp()

    def site(context: Context):  # type: ignore[no-untyped-def]
        return load_site_data(load_site_config(workspaces[int(context.node_config["partition-id"])]),
                              image_size=64)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        data = site(context)
        model = build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        res = train_plain(model, data.train, LocalPlan(steps=steps, batch_size=batch, learning_rate=1e-3,
                                                       seed=int(msg.content["config"]["server-round"])),
                          pick_device("auto"))
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": data.train.n_patients,
                                                            "train-loss": res.train_loss})}), reply_to=msg)

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        data = site(context)
        model = build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        res = evaluate(model, data.val, pick_device("auto"))
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": res.num_examples,
                                                            "val-loss": res.loss})}), reply_to=msg)

    server_app = ServerApp()
    elapsed: list[float] = []

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        t0 = time.perf_counter()
        FedAvg(fraction_train=1.0, fraction_evaluate=1.0).start(
            grid=grid, initial_arrays=ArrayRecord(build_model().state_dict()), num_rounds=rounds,
            train_config=ConfigRecord({}))
        elapsed.append(time.perf_counter() - t0)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(workspaces),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": min(len(workspaces), os.cpu_count() or 1),
                                                 "include_dashboard": False}})
    return elapsed[0] / rounds


def _medfed_child(sites_dir: Path, rounds: int, steps: int, batch: int, out: Path) -> float:
    from client.config import load_site_config
    from server.config import RunConfig
    from server.simulate import run_simulation_runtime

    workspaces = sorted(p for p in sites_dir.iterdir() if (p / "site.toml").is_file())
    configs = [load_site_config(w) for w in workspaces]
    cfg = RunConfig(num_server_rounds=rounds, local_steps=steps, batch_size=batch, run_dir=str(out), dp=False)
    run_simulation_runtime(cfg, configs)
    rows = json.loads((out / "metrics.json").read_text())["rounds"]
    return sum(r["seconds"] for r in rows) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer patients and rounds (< 5 min)")
    parser.add_argument("--child", choices=["medfed", "flower"])
    parser.add_argument("--sites-dir", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

    if args.child == "flower":
        print(json.dumps({"seconds_per_round": _flower_child(args.sites_dir, args.rounds, args.steps, args.batch)}))
        return
    if args.child == "medfed":
        print(json.dumps({"seconds_per_round": _medfed_child(args.sites_dir, args.rounds, args.steps,
                                                            args.batch, args.out)}))
        return

    from client.config import PrivacyPolicy
    from server.simulate import SimulationPlan, prepare_sites

    rounds = 3 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = SimulationPlan(sites=3, patients=60 if args.quick else None, policy=PrivacyPolicy(dp=False))
        prepare_sites(root / "prep", plan, 64)
        sites_dir = root / "prep" / "sites"
        results = {}
        for side in ("flower", "medfed"):
            cmd = [sys.executable, __file__, "--child", side, "--sites-dir", str(sites_dir), "--rounds",
                   str(rounds), "--steps", str(args.steps), "--batch", str(args.batch), "--out", str(root / side)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])["seconds_per_round"]
    ratio = results["medfed"] / results["flower"]
    print(f"{'engine':<34}{'s/round':>10}")
    print(f"{'Flower FedAvg.start (plain)':<34}{results['flower']:>10.2f}")
    print(f"{'medfed round loop (no privacy)':<34}{results['medfed']:>10.2f}")
    print(f"{'ratio medfed / Flower':<34}{ratio:>10.3f}   (target <= {TARGET})")
    print(json.dumps({"benchmark": "round_overhead", "ratios": {"medfed_vs_flower_fedavg": round(ratio, 4)},
                      "targets": {"medfed_vs_flower_fedavg": TARGET}, "pass": ratio <= TARGET,
                      "seconds_per_round": results, "rounds": rounds}))


if __name__ == "__main__":
    main()
