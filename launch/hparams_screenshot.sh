#!/usr/bin/env bash
# The HParams tab of a sweep, rendered by headless Chromium from a real TensorBoard serving <sweep>/hparams.
#   launch/hparams_screenshot.sh runs/sweep-qvh docs/sweep_hparams_qvh.png
# Needs chromium (Debian: apt-get install chromium) and the venv's tensorboard.
set -euo pipefail
sweep=${1:?usage: $0 SWEEP_DIR OUT.png}; out=${2:?usage: $0 SWEEP_DIR OUT.png}
port=${PORT:-6199}
tb=${TENSORBOARD:-.venv/bin/tensorboard}
"$tb" --logdir "$sweep/hparams" --port "$port" --host 127.0.0.1 >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.5; done
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,700 \
    --virtual-time-budget=15000 --screenshot="$out" "http://127.0.0.1:$port/#hparams" 2>/dev/null
echo "wrote $out"
