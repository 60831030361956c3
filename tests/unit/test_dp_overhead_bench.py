"""benchmarks/dp_overhead.py runs end to end on CPU at tiny sizes (sanity only: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_dp_overhead_runs_with_a_monai_network_and_stock_opacus_as_peer() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dp_overhead.py"), "--model", "resnet18", "--size",
                        "16", "--batch", "4", "--threads", "1", "--steps", "2", "--trials", "1"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model"] == "resnet18" and out["gpu"] == "none"
    t = out["results"][0]["threads"]["1"]
    assert set(t["ratios"]) == {"hooks", "functorch", "stock"} and all(v > 0 for v in t["ratios"].values())
    assert set(out["results"][0]["peak_mib"]) == {"plain", "hooks", "functorch", "stock"}
