#!/usr/bin/env bash
# What the protections buy, measured: the same small federation trained with ε ∈ {1, 4, 8, ∞}, with and
# without secure aggregation, each attacked at site-1 by `simulate --privacy-audit` (membership inference on
# its patients, gradient inversion of its update, the one-run canary audit of its ε). Writes
# OUT/results.md (the table) and OUT/roc.svg (membership ROC per setting). About 20 minutes on 2 cores.
#
#   examples/privacy_audit/run.sh [OUT]        (default runs/privacy-audit; needs the medfed venv active)
#
# The setting is made to overfit, so that the attacks have something to find without DP: two small sites
# (100 patients, half held out as the attack's non-members), faint findings (difficulty 10), 16 rounds of 50
# local Adam steps at batch 16, 32-pixel slices; site-1 is attacked (membership, inversion), site-2 holds
# the 100 canaries (mislabelled slices, each trained on with probability 1/2).
set -euo pipefail
OUT=${1:-runs/privacy-audit}
mkdir -p "$OUT"
export FLWR_TELEMETRY_ENABLED=0
COMMON=(--sites 2 --patients 100 --val-share 0.5 --difficulty 10 --rounds 16 --local-steps 50 --batch-size 16
        --learning-rate 0.003 --size 32 --seed 1 --privacy-audit --canaries 100 --canary-site site-2)
for eps in inf 8 4 1; do
  for secagg in on off; do
    run="$OUT/eps-$eps-secagg-$secagg"
    if [ -f "$run/attacks.json" ]; then continue; fi   # rerun = resume the table
    rm -rf "$run" "$run.keys"
    flags=()
    if [ "$eps" = inf ]; then flags+=(--no-dp); else flags+=(--epsilon "$eps"); fi
    if [ "$secagg" = off ]; then flags+=(--no-secagg); fi
    echo "== ε=$eps, secure aggregation $secagg"
    medfed-server simulate "${COMMON[@]}" "${flags[@]}" --out "$run" 2>&1 | grep -E "^(membership|inversion|canary|site )" || true
  done
done
python "$(dirname "$0")/table.py" "$OUT"
