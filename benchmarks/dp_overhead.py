"""Training throughput (images/s) of medfed's model: non-private vs DP-SGD (Opacus modes).

Same model, same batch size, same data, same process (modes interleaved over repeats, best
of each kept); peak memory per mode from a child process each. Ends with one JSON line.

    python benchmarks/dp_overhead.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
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
MODES = ("plain", "hooks", "functorch")


def _cohort(patients: int, size: int = 64) -> Cohort:
    rng = np.random.default_rng(0)
    n = patients * 3
    return Cohort(rng.uniform(size=(n, size, size)).astype(np.float32), rng.integers(0, 2, n).astype(np.float32),
                  np.repeat(np.arange(patients), 3), patients)


def _rss_mib() -> float:
    """Current resident memory of this process (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _throughput(mode: str, cohort: Cohort, batch: int, steps: int, device: torch.device,
                samples: list[float] | None = None) -> float:
    model = build_model(seed=0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(PatientImages(cohort, seed=0), batch_size=batch, shuffle=True, drop_last=True)
    if mode != "plain":
        model, opt, loader = make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                          max_grad_norm=1.0, grad_sample_mode=mode)
    loss_fn = nn.BCEWithLogitsLoss()
    images, done, it = 0, 0, iter(loader)
    start = 0.0
    while done < steps + 2:  # two warm-up steps are not timed
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        if done == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if done >= 2:
            images += len(y)
        if samples is not None:
            samples.append(_rss_mib())
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    device = torch.device(args.device)
    cohort = _cohort(600)
    steps = 20 if args.quick else 60
    if args.child:  # memory used by training itself: peak while training minus the baseline before it
        baseline = _rss_mib()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated() / 2**20
        samples: list[float] = []
        _throughput(args.child, cohort, args.batch, 10, device, samples)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else max(samples)
        print(json.dumps({"peak_mib": peak - baseline}))
        return

    best = {m: 0.0 for m in MODES}
    for _ in range(2 if args.quick else 3):
        for mode in MODES:
            best[mode] = max(best[mode], _throughput(mode, cohort, args.batch, steps, device))
    memory = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--device", args.device, "--batch",
                              str(args.batch)], capture_output=True, text=True, check=True)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    ratios = {f"{m}_vs_plain": round(best[m] / best["plain"], 4) for m in MODES if m != "plain"}
    print(f"device {device}, batch {args.batch}, model SliceNet ({sum(p.numel() for p in build_model().parameters())} params)")
    print(f"{'mode':<12}{'images/s':>12}{'ratio':>8}{'train MiB':>12}")
    for m in MODES:
        print(f"{m:<12}{best[m]:>12.1f}{best[m] / best['plain']:>8.3f}{memory[m]:>12.1f}")
    fastest = max(ratios.values())
    print(json.dumps({"benchmark": "dp_overhead", "ratios": ratios, "targets": {"best_dp_vs_plain": TARGET},
                      "pass": fastest >= TARGET, "images_per_s": best, "peak_mib": memory,
                      "device": str(device)}))


if __name__ == "__main__":
    main()
