#!/usr/bin/env bash
# Multi-layer LAM against the same ViT without masks (model.lam.layers=none) on the full Fashion-MNIST,
# 3 seeds each at a short budget, then both means ± sample std of the official 10k test top-1.
#   launch/fashion_mnist_seeds.sh [STORAGE] [STEPS]        (defaults: runs/fm_seeds, 700 steps ≈ 5 min each here)
# Re-running skips finished runs and resumes an interrupted one (same command, same run name).
set -euo pipefail
cd "$(dirname "$0")/.."
STORAGE=${1:-runs/fm_seeds}
STEPS=${2:-700}
LAMSCALE=${LAMSCALE:-lamscale}
for seed in 0 1 2; do
  for variant in lam vanilla; do
    name="${variant}-s${seed}"
    [ -f "$STORAGE/$name/metrics_val.json" ] && { echo "seeds: $name done"; continue; }
    layers=all; [ "$variant" = vanilla ] && layers=none
    start=$(date +%s)
    $LAMSCALE train configs/fashion_mnist.yaml "run.storage=$STORAGE" "run.name=$name" "train.seed=$seed" \
      "model.lam.layers=$layers" "train.max_steps=$STEPS" "train.warmup_steps=100" "train.eval_every=100000" \
      "train.ckpt_every=$STEPS"
    echo "seeds: $name took $(( $(date +%s) - start )) s" | tee -a "$STORAGE/timings.txt"
  done
done
python3 - "$STORAGE" <<'EOF'
import json, statistics, sys
from pathlib import Path
storage = Path(sys.argv[1])
rows = {}
for variant in ("lam", "vanilla"):
    rows[variant] = [json.loads((storage / f"{variant}-s{s}" / "metrics_val.json").read_text())["brief"]["top1"] for s in range(3)]
    v = rows[variant]
    print(f"{variant:8s} top-1 {statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}  (seeds 0,1,2: {', '.join(map(str, v))})")
(storage / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
EOF
