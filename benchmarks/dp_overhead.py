"""Training throughput (images/s) of medfed's model: non-private vs DP-SGD (Opacus modes).

Same model, same batch size, same data, same process. In each trial the modes take turns of
two steps each; the ratio of a mode is the median over trials of its speed divided by plain's
speed in the same trial (this machine's speed drifts by +-20% within seconds; modes that
alternate every two steps share the drift). Measured at 1 CPU thread (how a simulated site
trains: one CPU each) and at torch's default thread count. Peak memory per mode from a child
process each. Ends with one JSON line.

    python benchmarks/dp_overhead.py [--quick] [--device cpu|cuda] [--threads 1,2]
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
BLOCK = 2  # steps per turn when modes alternate inside a trial


def _cohort(patients: int, size: int = 64) -> Cohort:
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

    def __init__(self, mode: str, cohort: Cohort, batch: int, device: torch.device) -> None:
        model = build_model(seed=0).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = DataLoader(PatientImages(cohort, seed=0), batch_size=batch, shuffle=True, drop_last=mode == "plain",
                            generator=torch.Generator().manual_seed(0))
        if mode != "plain":
            noise = torch.Generator(device=device)
            noise.manual_seed(1)
            model, opt, loader = make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                              max_grad_norm=1.0, noise_generator=noise, secure_mode=mode == "secure",
                                              grad_sample_mode="functorch" if mode == "functorch" else "hooks")
        self.model, self.opt, self.loader, self.device = model, opt, loader, device
        self.loss_fn = nn.BCEWithLogitsLoss(reduction="mean" if mode == "plain" else "sum")  # make_private: sums
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
            self.loss_fn(self.model(x), y).backward()
            self.opt.step()
            self.images += len(y) if timed else 0
            if samples is not None:
                samples.append(_rss_mib())
        sync()
        self.seconds += time.perf_counter() - start if timed else 0.0


def _trials(cohort: Cohort, batch: int, steps: int, trials: int, device: torch.device) -> dict[str, list[float]]:
    """images/s of every mode in each trial.

    Inside a trial the modes take turns in blocks of ``BLOCK`` steps until each has run
    ``steps`` timed steps, so the machine's drift falls on all modes alike.
    """
    speeds: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(trials):
        trainers = {m: _Trainer(m, cohort, batch, device) for m in MODES}
        for t in trainers.values():
            t.steps(2, timed=False)  # warm-up
        for _ in range(0, steps, BLOCK):
            for t in trainers.values():
                t.steps(BLOCK)
        for m, t in trainers.items():
            speeds[m].append(t.images / t.seconds)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        help="CPU thread counts to measure (comma-separated); a simulated site trains with 1")
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    device = torch.device(args.device)
    # 10 batches of patients: Opacus' Poisson rate 1/len(loader) then gives DP steps the same
    # expected batch as the plain ones (600 patients gave DP batches of 60 against 64)
    cohort = _cohort(10 * args.batch)
    steps = 20 if args.quick else 40
    if args.child:  # memory used by training itself: peak while training minus the baseline before it
        baseline = _rss_mib()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated() / 2**20
        samples: list[float] = []
        _Trainer(args.child, cohort, args.batch, device).steps(10, samples=samples)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else max(samples)
        print(json.dumps({"peak_mib": peak - baseline}))
        return

    memory = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--device", args.device, "--batch",
                              str(args.batch)], capture_output=True, text=True, check=True)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    print(f"device {device}, batch {args.batch}, model SliceNet ({sum(p.numel() for p in build_model().parameters())} "
          f"params); median over trials of images/s, and of each trial's ratio to plain in that trial")
    print(f"{'threads':<9}{'mode':<12}{'images/s':>10}{'ratio':>8}{'train MiB':>11}")
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    ratios: dict[str, float] = {}
    speeds_by_threads = {}
    for t in dict.fromkeys(threads):
        torch.set_num_threads(t)
        speeds = _trials(cohort, args.batch, steps, 7 if args.quick else 15, device)
        speeds_by_threads[t] = {m: statistics.median(v) for m, v in speeds.items()}
        for m in MODES:
            ratio = statistics.median(a / b for a, b in zip(speeds[m], speeds["plain"], strict=True))
            if m != "plain":
                ratios[f"{m}_vs_plain_{t}_threads"] = round(ratio, 4)
            print(f"{t:<9}{m:<12}{speeds_by_threads[t][m]:>10.1f}{ratio:>8.3f}{memory[m]:>11.1f}")
    best = {t: max(ratios[f"{m}_vs_plain_{t}_threads"] for m in ("hooks", "functorch")) for t in speeds_by_threads}
    print(json.dumps({"benchmark": "dp_overhead", "ratios": ratios, "targets": {"best_dp_vs_plain": TARGET},
                      "pass": {str(t): b >= TARGET for t, b in best.items()}, "images_per_s": speeds_by_threads,
                      "peak_mib": memory, "device": str(device)}))


if __name__ == "__main__":
    main()
