"""Training throughput (images/s) of a network: non-private vs DP-SGD (medfed's Opacus modes, and stock Opacus).

Same model, same batch size, same data, same process. In each trial the modes take turns of
two steps each; the ratio of a mode is the median over trials of its speed divided by plain's
speed in the same trial (this machine's speed drifts by +-20% within seconds; modes that
alternate every two steps share the drift). Measured at 1 CPU thread (how a simulated site
trains: one CPU each) and at torch's default thread count. Peak memory per mode from a child
process each. Ends with one JSON line.

Stock Opacus (``PrivacyEngine().make_private`` with its defaults: mean loss, its own Conv2d
sampler) is the peer: it runs in a child process of its own (medfed registers a Conv2d sampler
process-wide), alternating with plain steps there, so its ratio is also side by side with plain.

    python benchmarks/dp_overhead.py [--quick] [--device cpu|cuda] [--threads 1,2]
        [--model slicenet|densenet121|resnet18|...] [--size 64] [--batch 64,256]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from client.dicom.cohort import Cohort  # noqa: E402
from client.models import build_model  # noqa: E402
from client.train import PatientImages  # noqa: E402
from privacy.dp import make_private  # noqa: E402

TARGET = 0.8  # DP throughput / non-private throughput
MODES = ("plain", "hooks", "functorch", "secure")  # secure: hooks with Opacus' secure_mode noise sampling
STOCK_MODES = ("plain", "stock")  # stock Opacus, measured in its own process
GPU_TARGETS = {"dp_vs_plain": 0.5, "vs_stock_ratio": 1.5}  # issue 22: DenseNet-121 at 224 px on a GPU
BLOCK = 2  # steps per turn when modes alternate inside a trial


def _cohort(patients: int, size: int = 64) -> Cohort:
    """Random images: throughput does not depend on their content."""
    rng = np.random.default_rng(0)
    n = patients * 3
    return Cohort(rng.uniform(size=(n, size, size)).astype(np.float32), rng.integers(0, 2, n).astype(np.float32),
                  np.repeat(np.arange(patients), 3), patients)


def _rss_mib() -> float:
    """Current resident memory of this process (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class _Trainer:
    """One mode's model, optimizer and loader; ``steps(k)`` trains k steps and times them."""

    def __init__(self, mode: str, cohort: Cohort, batch: int, device: torch.device, network: str = "slicenet") -> None:
        model = build_model(network, seed=0).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = DataLoader(PatientImages(cohort, seed=0), batch_size=batch, shuffle=True, drop_last=mode == "plain",
                            generator=torch.Generator().manual_seed(0))
        if mode == "stock":
            from opacus import PrivacyEngine

            model, opt, loader = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                              noise_multiplier=1.0, max_grad_norm=1.0)
        elif mode != "plain":
            noise = torch.Generator(device=device)
            noise.manual_seed(1)
            model, opt, loader = make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                              max_grad_norm=1.0, noise_generator=noise, secure_mode=mode == "secure",
                                              grad_sample_mode="functorch" if mode == "functorch" else "hooks")
        self.model, self.opt, self.loader, self.device = model, opt, loader, device
        # medfed's make_private takes the summed loss; plain and stock Opacus the mean
        self.loss_fn = nn.BCEWithLogitsLoss(reduction="mean" if mode in ("plain", "stock") else "sum")
        self.batches = iter(loader)
        self.images, self.seconds = 0, 0.0

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def steps(self, k: int, *, timed: bool = True, samples: list[float] | None = None) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(k):
            x, y = self._next()
            x, y = x.to(self.device), y.to(self.device)
            self.opt.zero_grad(set_to_none=True)
            self.loss_fn(self.model(x).reshape(y.shape), y).backward()
            self.opt.step()
            self.images += len(y) if timed else 0
            if samples is not None:
                samples.append(_rss_mib())
        sync()
        self.seconds += time.perf_counter() - start if timed else 0.0


def _trials(cohort: Cohort, batch: int, steps: int, trials: int, device: torch.device, network: str = "slicenet",
            modes: tuple[str, ...] = MODES) -> dict[str, list[float]]:
    """images/s of every mode in each trial.

    Inside a trial the modes take turns in blocks of ``BLOCK`` steps until each has run
    ``steps`` timed steps, so the machine's drift falls on all modes alike.
    """
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(trials):
        trainers = {m: _Trainer(m, cohort, batch, device, network) for m in modes}
        for t in trainers.values():
            t.steps(2, timed=False)  # warm-up
        for _ in range(0, steps, BLOCK):
            for t in trainers.values():
                t.steps(BLOCK)
        for m, t in trainers.items():
            speeds[m].append(t.images / t.seconds)
    return speeds


def _child(args: argparse.Namespace, device: torch.device, batch: int) -> None:
    """One measurement in a fresh process: peak training memory of a mode, or stock Opacus' trials."""
    cohort = _cohort(10 * batch, args.size)
    if args.stock:  # no medfed sampler is registered in this process: stock Opacus as users get it
        torch.set_num_threads(args.stock)
        speeds = _trials(cohort, batch, args.steps, args.trials, device, args.model, STOCK_MODES)
        print(json.dumps({"speeds": speeds}))
        return
    baseline = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    samples: list[float] = []
    _Trainer(args.child, cohort, batch, device, args.model).steps(10 if args.size <= 64 else 3, samples=samples)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else max(samples)
    print(json.dumps({"peak_mib": peak - baseline}))


def _run_child(args: argparse.Namespace, batch: int, *extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--device", args.device, "--batch", str(batch), "--model",
                          args.model, "--size", str(args.size), "--steps", str(args.steps), "--trials",
                          str(args.trials), *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(speeds: dict[str, list[float]], mode: str) -> float:
    return statistics.median(a / b for a, b in zip(speeds[mode], speeds["plain"], strict=True))


def _measure(args: argparse.Namespace, device: torch.device, batch: int, modes: tuple[str, ...]) -> dict:
    cohort = _cohort(10 * batch, args.size)  # 10 batches: Poisson rate 1/10 gives DP the plain batch size
    memory = {m: _run_child(args, batch, "--child", m)["peak_mib"] for m in (*modes, "stock")}
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    result: dict = {"batch": batch, "peak_mib": memory, "threads": {}}
    for t in dict.fromkeys(threads):
        torch.set_num_threads(t)
        speeds = _trials(cohort, batch, args.steps, args.trials, device, args.model, modes)
        stock = _run_child(args, batch, "--stock", str(t))["speeds"]
        ratios = {m: round(_ratio(speeds, m), 4) for m in modes if m != "plain"}
        ratios["stock"] = round(_ratio(stock, "stock"), 4)
        best = max(v for m, v in ratios.items() if m in ("hooks", "functorch"))
        result["threads"][t] = {"ratios": ratios, "best_vs_stock": round(best / ratios["stock"], 3),
                                "images_per_s": {m: statistics.median(v) for m, v in speeds.items()}
                                | {"stock": statistics.median(stock["stock"]),
                                   "plain_in_stock_process": statistics.median(stock["plain"])}}
        for m in modes:
            ratio = 1.0 if m == "plain" else ratios[m]
            print(f"{batch:<7}{t:<9}{m:<12}{result['threads'][t]['images_per_s'][m]:>10.1f}{ratio:>8.3f}"
                  f"{memory[m]:>11.1f}")
        print(f"{batch:<7}{t:<9}{'stock':<12}{result['threads'][t]['images_per_s']['stock']:>10.1f}"
              f"{ratios['stock']:>8.3f}{memory['stock']:>11.1f}   (medfed best / stock: "
              f"{result['threads'][t]['best_vs_stock']:.2f}x)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="slicenet", help="a built-in network (client.model_names)")
    parser.add_argument("--size", type=int, default=64, help="input size in pixels")
    parser.add_argument("--batch", default="64", help="batch sizes (comma-separated)")
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        help="CPU thread counts to measure (comma-separated); a simulated site trains with 1")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per mode and trial (default 40; --quick 20)")
    parser.add_argument("--trials", type=int, default=0, help="trials (default 15; --quick 7)")
    parser.add_argument("--child", choices=(*MODES, "stock"))
    parser.add_argument("--stock", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.quick else 40)
    args.trials = args.trials or (7 if args.quick else 15)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batch.split(",")]
    if args.child or args.stock:
        _child(args, device, batches[0])
        return
    modes = MODES if args.model == "slicenet" else ("plain", "hooks", "functorch")
    params = sum(p.numel() for p in build_model(args.model).parameters())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"device {device} (GPU: {gpu}), model {args.model} ({params} params) at {args.size} px; median over trials "
          "of images/s, and of each trial's ratio to plain in that trial (stock Opacus: to plain in its own process)")
    print(f"{'batch':<7}{'threads':<9}{'mode':<12}{'images/s':>10}{'ratio':>8}{'train MiB':>11}")
    results = [_measure(args, device, b, modes) for b in batches]
    print(json.dumps({"benchmark": "dp_overhead", "model": args.model, "size": args.size, "device": str(device),
                      "gpu": gpu, "targets": {"best_dp_vs_plain_cpu": TARGET, **GPU_TARGETS}, "results": results}))


if __name__ == "__main__":
    main()
