"""NVIDIA FLARE client script (Client API) for ``benchmarks/platforms.py``: each round it validates
the received global model on the site's validation patients (as medfed's evaluation exchange does)
and trains it with medfed's own ``train_plain`` on the site's cached cohort, the same local work as
``medfed-server simulate --no-dp --no-secagg``. Runs inside the benchmark's FLARE venv."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nvflare.client as flare
import torch

from client.config import load_site_config
from client.models import build_model, pick_device
from client.site import load_site_data
from client.train import LocalPlan, evaluate, train_plain


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspaces", required=True, help="site-1=/path,site-2=/path,...")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--learning-rate", type=float, required=True)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--times", required=True, help="JSON lines of (site, round, event, t)")
    ap.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)  # as Ray gives each of medfed's virtual sites one CPU
    flare.init()
    site = flare.get_site_name()
    workspace = dict(kv.split("=", 1) for kv in args.workspaces.split(","))[site]
    data = load_site_data(load_site_config(Path(workspace)), image_size=64)
    device = pick_device("auto")
    model = build_model()

    def mark(rnd: int, event: str) -> None:
        with open(args.times, "a") as fh:
            fh.write(json.dumps({"site": site, "round": rnd, "event": event, "t": time.time()}) + "\n")

    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        rnd = int(received.current_round or 0)
        mark(rnd, "receive")
        model.load_state_dict({k: torch.as_tensor(v) for k, v in received.params.items()})
        val = evaluate(model, data.val, device)
        plan = LocalPlan(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         seed=rnd, optimizer=args.optimizer)
        result = train_plain(model, data.train, plan, device)
        flare.send(flare.FLModel(params={k: v.cpu() for k, v in model.state_dict().items()},
                                 metrics={"val_auroc": float(val.auroc or 0.0), "train_loss": result.train_loss},
                                 meta={"NUM_STEPS_CURRENT_ROUND": args.steps}))
        mark(rnd, "send")


if __name__ == "__main__":
    main()
