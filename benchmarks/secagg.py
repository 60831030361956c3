"""Secure aggregation cost: medfed SecAgg+ vs plain FedAvg rounds, and the protocol's
per-site cost as the federation grows.

Part 1 (``rounds``): the same generated sites, model and local work (default: 50 DP-SGD
steps of batch 64, as ``simulate`` runs; ``--toy``: 10 plain SGD steps of batch 16, which
exposes the protocol's fixed latency) through ``medfed-server simulate`` with and without
``--no-secagg``, and
through Flower's own legacy-API SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``, all
sites as share holders, threshold n//2+1) as the peer, at 5 and 10 (and 20 without
``--quick``) virtual sites in Flower's simulation runtime; mean seconds of rounds 2..R
(round 1 includes the runtime's start-up on every side).

Part 2 (``protocol``): the five SecAgg+ stages (with the consistency check; above 64 sites also
the graph nonce's reveal) in one process
for n = 10, 20, 40, 80 sites with the default model's update size: per-site CPU time and bytes
sent per site against float32 FedAvg. The complete graph up to 64 sites (per-site cost grows
with n there), a sparse graph above (per-site cost follows k).

``--repeats R`` runs part 1 R times in alternating order; ratios are medians of the paired
per-repeat ratios.

    python benchmarks/secagg.py [--quick] [--toy] [--repeats 3]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from client.models import build_model, get_arrays  # noqa: E402
from privacy.secagg.params import SecAggParams  # noqa: E402
from privacy.secagg.server import Aggregator  # noqa: E402
from privacy.secagg.site import SiteSession  # noqa: E402
from privacy.secagg.wire import adverts_to_bytes, boxes_to_bytes, reveals_to_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.25  # SecAgg+ round time (with the consistency round) at 10 sites at most 1.25x plain FedAvg


@dataclass(frozen=True)
class Work:
    """The local work of a round, the same on every side."""

    rounds: int
    patients: int
    steps: int
    batch: int
    dp: bool


def round_seconds(sites: int, secagg: bool, work: Work, tmp: Path, repeat: int = 0) -> float:
    out = tmp / f"run-{sites}-{int(secagg)}-{repeat}"
    cmd = [sys.executable, "-m", "server.cli", "simulate", "--sites", str(sites), "--rounds", str(work.rounds),
           "--patients", str(work.patients), "--local-steps", str(work.steps), "--batch-size", str(work.batch),
           "--seed", "0", "--out", str(out)]
    if not work.dp:
        cmd.append("--no-dp")
    if not secagg:
        cmd.append("--no-secagg")
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=7200)
    metrics = json.loads((out / "metrics.json").read_text())
    return statistics.mean(r["seconds"] for r in metrics["rounds"][1:])


FLOWER_CHILD = r"""
import json, os, sys, time, logging
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
from pathlib import Path
import numpy as np, torch
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation
from client.config import load_site_config
from client.models import build_model, get_arrays, set_arrays
from client.site import load_site_data
from client.train import LocalPlan, evaluate, train_plain, train_private

logging.getLogger("flwr").setLevel(logging.ERROR)
sites_dir, rounds, steps, batch, dp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
workspaces = sorted(p for p in sites_dir.iterdir() if (p / "site.toml").is_file())
names = list(get_arrays(build_model()))
marks = []


class Site(NumPyClient):
    def __init__(self, ws):
        self.config = load_site_config(ws)

    def fit(self, parameters, config):
        data = load_site_data(self.config, image_size=64)
        model = build_model()
        set_arrays(model, dict(zip(names, parameters)))
        plan = LocalPlan(steps=steps, batch_size=batch, learning_rate=2e-3, seed=0)
        if dp:
            train_private(model, data.train, plan, torch.device("cpu"), noise_multiplier=1.0, max_grad_norm=1.0,
                          noise_seed=1)
        else:
            train_plain(model, data.train, plan, torch.device("cpu"))
        return list(get_arrays(model).values()), data.train.n_patients, {}

    def evaluate(self, parameters, config):
        data = load_site_data(self.config, image_size=64)
        model = build_model()
        set_arrays(model, dict(zip(names, parameters)))
        res = evaluate(model, data.val, torch.device("cpu"))
        return float(res.loss), res.num_examples, {}


def client_fn(context):
    return Site(workspaces[int(context.node_config["partition-id"])]).to_client()


class Timed(FedAvg):
    def configure_fit(self, server_round, parameters, client_manager):
        marks.append(time.monotonic())
        return super().configure_fit(server_round, parameters, client_manager)


server = ServerApp()


@server.main()
def main(grid, context):
    strategy = Timed(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=len(workspaces),
                     min_evaluate_clients=len(workspaces), min_available_clients=len(workspaces),
                     initial_parameters=__import__("flwr").common.ndarrays_to_parameters(
                         list(get_arrays(build_model()).values())))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    n = len(workspaces)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=n // 2 + 1))
    workflow(grid, legacy)
    marks.append(time.monotonic())


run_simulation(server_app=server, client_app=ClientApp(client_fn=client_fn, mods=[secaggplus_mod]),
               num_supernodes=len(workspaces),
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                               "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}})
print(json.dumps({"seconds_per_round": float(np.mean(np.diff(marks)[1:]))}))
"""


def flower_secaggplus_seconds(sites_dir: Path, work: Work) -> float | None:
    """Flower's own (legacy-API) SecAgg+ on the same sites, model and local work; None if it fails."""
    r = subprocess.run([sys.executable, "-c", FLOWER_CHILD, str(sites_dir), str(work.rounds), str(work.steps),
                        str(work.batch), str(int(work.dp))], capture_output=True, text=True, cwd=ROOT, timeout=7200)
    if r.returncode != 0:
        print(f"Flower SecAgg+ peer failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(r.stdout.strip().splitlines()[-1])["seconds_per_round"])


def protocol_cost(n: int, dim: int) -> dict[str, float]:
    names = [f"site-{i:03d}" for i in range(n)]
    ids = {s: Ed25519PrivateKey.generate() for s in names}
    roster = {s: key.public_key() for s, key in ids.items()}
    rng = np.random.default_rng(0)
    update = {s: rng.normal(0, 0.01, dim) for s in names}
    site_s, sent = 0.0, 0
    agg = Aggregator(SecAggParams.for_sites("bench", 1, names))
    sessions, adverts = {}, {}
    for s in names:
        t = time.process_time()
        sessions[s], adverts[s] = SiteSession.start("bench", 1, s, ids[s])
        site_s += time.process_time() - t
        sent += len(adverts_to_bytes({s: adverts[s]}))
    params, relay = agg.collect_adverts(adverts)
    nonces: dict[str, bytes] = {}
    if not params.complete:  # above 64 sites: each site reveals its graph nonce for the fixed set
        for s in names:
            t = time.process_time()
            nonces[s] = sessions[s].reveal(params, relay, roster)
            site_s += time.process_time() - t
            sent += len(nonces[s])
        params = agg.collect_nonces(nonces)
    outboxes = {}
    for s in names:
        t = time.process_time()
        outboxes[s] = sessions[s].share_keys(params, relay, roster, nonces=nonces)
        site_s += time.process_time() - t
        sent += len(boxes_to_bytes(outboxes[s]))
    inboxes, sharers = agg.route_shares(outboxes)
    masked = {}
    for s in names:
        t = time.process_time()
        masked[s] = sessions[s].masked_input(update[s], 100, inboxes[s], sharers)
        site_s += time.process_time() - t
        sent += masked[s].nbytes
    survivors = agg.collect_inputs(masked)
    signed = {}
    for s in survivors:
        t = time.process_time()
        signed[s] = sessions[s].consistency(survivors, ids[s])
        site_s += time.process_time() - t
        sent += len(signed[s])
    signatures = agg.collect_signatures(signed)
    reveals = {}
    for s in survivors:
        t = time.process_time()
        reveals[s] = sessions[s].unmask(signatures, roster)
        site_s += time.process_time() - t
        sent += len(reveals_to_bytes(reveals[s]))
    t = time.process_time()
    agg.finish(reveals)
    server_s = time.process_time() - t
    return {"n": n, "k": params.k, "degree": params.degree, "site_ms": 1000 * site_s / n, "server_ms": 1000 * server_s,
            "bytes_per_site": sent / n, "float32_bytes": 4 * dim, "bytes_ratio": sent / n / (4 * dim)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 and 10 sites, 3 rounds")
    parser.add_argument("--toy", action="store_true", help="10 plain SGD steps of batch 16 instead of the default "
                        "run (50 DP-SGD steps of batch 64): shows the protocol's latency floor")
    parser.add_argument("--repeats", type=int, default=1, help="paired repeats of part 1 (alternating order)")
    args = parser.parse_args()
    work = Work(rounds=3 if args.quick else 4, patients=60 if args.toy else 200, steps=10 if args.toy else 50,
                batch=16 if args.toy else 64, dp=not args.toy)
    dim = sum(int(np.prod(v.shape)) for v in get_arrays(build_model()).values())
    sizes = (5, 10) if args.quick else (5, 10, 20)
    timing: dict[int, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="medfed-secagg-bench-") as tmp:
        for n in sizes:
            runs: dict[str, list[float]] = {"plain_s": [], "secagg_s": [], "flower_secaggplus_s": []}
            for rep in range(args.repeats):
                order = (False, True) if rep % 2 == 0 else (True, False)
                got = {secagg: round_seconds(n, secagg, work, Path(tmp), rep) for secagg in order}
                flower = flower_secaggplus_seconds(Path(tmp) / f"run-{n}-0-{rep}" / "sites", work)
                runs["plain_s"].append(got[False])
                runs["secagg_s"].append(got[True])
                runs["flower_secaggplus_s"].append(flower if flower is not None else float("nan"))
                peer = f", Flower SecAgg+ {flower:7.2f} s/round" if flower is not None else ", Flower SecAgg+ failed"
                print(f"{n:3d} sites, repeat {rep + 1}: FedAvg {got[False]:7.2f} s/round, medfed SecAgg+ "
                      f"{got[True]:7.2f} s/round (ratio {got[True] / got[False]:.3f}){peer}", flush=True)
            ratios = [m / p for m, p in zip(runs["secagg_s"], runs["plain_s"], strict=True)]
            vs_flower = [m / f for m, f in zip(runs["secagg_s"], runs["flower_secaggplus_s"], strict=True) if f == f]
            timing[n] = {**runs, "ratio": statistics.median(ratios),
                         "vs_flower": statistics.median(vs_flower) if vs_flower else None}
            print(f"{n:3d} sites: median ratio to FedAvg {timing[n]['ratio']:.3f}, to Flower's SecAgg+ "
                  f"{timing[n]['vs_flower']}", flush=True)
    protocol = [protocol_cost(n, dim) for n in (10, 20, 40, 80)]
    print(f"\nprotocol cost per site, update of {dim} values (float32 FedAvg sends {4 * dim} bytes):")
    print("   n   k  neighbours  site ms  server ms  bytes/site  x float32")
    for p in protocol:
        print(f"{p['n']:4d} {p['k']:3d} {p['degree']:10d} {p['site_ms']:8.1f} {p['server_ms']:10.1f} "
              f"{p['bytes_per_site']:11.0f} {p['bytes_ratio']:9.2f}")
    ratio10 = float(timing[10]["ratio"])  # type: ignore[arg-type]
    flower10 = timing[10]["vs_flower"]
    print(json.dumps({"benchmark": "secagg", "ratios": {"secagg_vs_fedavg_10_sites": round(ratio10, 4),
                                                         "secagg_vs_flower_10_sites": flower10,
                                                         **{f"secagg_vs_fedavg_{n}_sites": round(float(t["ratio"]), 4)
                                                            for n, t in timing.items()}},  # type: ignore[arg-type]
                      "targets": {"secagg_vs_fedavg_10_sites": TARGET, "secagg_vs_flower_10_sites": 1.0},
                      "pass": ratio10 <= TARGET and (flower10 is None or flower10 <= 1.0),
                      "work": work.__dict__, "rounds": timing, "protocol": protocol}))


if __name__ == "__main__":
    main()
