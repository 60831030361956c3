"""Cost of the signed audit trail per round, relative to the round time.

Runs a real simulation (DP on, audit logs on), reads how many entries the server and the
sites wrote per round and the measured round times from ``metrics.json``, then replays
exactly those entries (same events, same data, Ed25519 signing, fsync per entry, same
file system) into fresh logs and times them. Ends with one JSON line.

    python benchmarks/audit.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from privacy.audit.log import AuditLog, read_entries  # noqa: E402
from privacy.audit.verify import run_logs  # noqa: E402

TARGET = 0.01  # logging + signing at most 1 % of the round time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 sites x 60 patients, 3 rounds")
    args = parser.parse_args()
    sites, patients, rounds = (3, 60, 3) if args.quick else (3, 200, 5)
    with tempfile.TemporaryDirectory(prefix="medfed-audit-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "server.cli", "simulate", "--sites", str(sites), "--rounds", str(rounds),
               "--patients", str(patients), "--out", str(run_dir)]
        subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1], timeout=3600)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        round_seconds = [r["seconds"] for r in metrics["rounds"]]
        entries = {actor: [e for f in files for e in read_entries(f)] for actor, files in run_logs(run_dir).items()}
        replay = Path(tmp) / "replay"
        replay.mkdir()
        start = time.perf_counter()
        for actor, items in entries.items():
            log = AuditLog(replay / f"{actor}.jsonl", actor, Ed25519PrivateKey.generate())
            for e in items:
                log.append(e.event, e.data)
                if actor == "server" and e.event in ("round-start", "checkpoint-written"):
                    log.head()  # the head each request carries (the sites counter-sign it)
                if actor != "server" and e.event in ("round-trained", "refused"):
                    read_entries(log.path)  # what a site reads per round: has it joined this run?
                    log.head()  # the head it sends back with its reply
        audit_seconds = time.perf_counter() - start
    n_entries = sum(len(v) for v in entries.values())
    per_round = audit_seconds / len(round_seconds)
    ratio = per_round / statistics.mean(round_seconds)
    print(f"{len(round_seconds)} rounds, {sites} sites: {n_entries} audit entries "
          f"({n_entries / len(round_seconds):.1f} per round, server and sites together)")
    print(f"  round time (mean)              {statistics.mean(round_seconds):9.3f} s")
    print(f"  audit logging + signing/round  {per_round * 1000:9.3f} ms")
    print(f"  ratio                          {ratio:9.5f}   (target < {TARGET})")
    print(json.dumps({"benchmark": "audit", "ratios": {"audit_vs_round": round(ratio, 6)},
                      "targets": {"audit_vs_round": TARGET}, "pass": ratio < TARGET,
                      "entries": n_entries, "rounds": len(round_seconds),
                      "round_seconds_mean": statistics.mean(round_seconds), "audit_ms_per_round": per_round * 1000}))


if __name__ == "__main__":
    main()
