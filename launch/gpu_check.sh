#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a machine with one CUDA GPU, everything the CPU tests cannot reach.
#   1. train `tiny` on the GPU: one Ray worker (NCCL), bf16, the fused Triton LAM kernel, ZeRO-2
#   2. the same with ZeRO-3; the driver is SIGKILLed mid-run (LAMSCALE_FAULT) and `lamscale resume` finishes it
#   3. `lamscale bench attention --device cuda` and `bench encoder --device cuda` (incl. the DeepSpeed bf16 step)
# then one summary block: card, versions, each step's PASS/FAIL and seconds, the eval lines, the bench tables.
# Every step runs even after a failure; the exit status is non-zero when any step failed.
# Sized for < 8 minutes on an H100/H200-class card (first Triton compile included); a hung step is cut
# off so that the whole check ends within GPU_CHECK_BUDGET_S (default 540 s) plus the summary.
#
#   launch/gpu_check.sh             run it (outputs under $OUT, default runs/gpu-check-<date>)
#   launch/gpu_check.sh --dry-run   no GPU needed: validate every config override and print the plan
#   launch/gpu_check.sh --rehearse  no GPU needed: the same steps, small, on CPU (gloo, chunked backend), to
#                                   exercise this script's kill/resume/summary logic; it checks nothing on a GPU
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}  # runs/ is git-ignored
MODE=${1:-gpu}
case "$MODE" in gpu|--dry-run|--rehearse) ;; *) echo "usage: $0 [--dry-run|--rehearse]" >&2; exit 2 ;; esac

if [ "$MODE" = --rehearse ]; then
    DEVICE=cpu STEPS=30 CKPT=10 EVAL=30 KILL=25 RESUMED=20 SLOWER=3  # step limits × SLOWER: bf16 on a CPU crawls
    ON_DEVICE=(cluster.use_gpu=false model.lam.backend=chunked)
    ATTENTION=(--device cpu --lengths 256 --cases sdpa-nomask,chunked-mul,sdpa-add --repeats 1)
    ENCODER=(--device cpu --lengths 256 --cases vanilla-sdpa,lam-mul-chunked,lam-mul-deepspeed --repeats 1
             --paired-rounds 2)
else
    DEVICE=cuda STEPS=300 CKPT=50 EVAL=150 KILL=170 RESUMED=150 SLOWER=1  # killed between the commits at 150, 200
    ON_DEVICE=(cluster.use_gpu=true model.lam.backend=triton)
    ATTENTION=(--device cuda --lengths 4096,32768 --cases sdpa-nomask,triton-mul,triton-add,sdpa-add --repeats 5)
    ENCODER=(--device cuda --lengths 8192,36000 --cases vanilla-sdpa,lam-mul-triton,lam-mul-deepspeed --repeats 3
             --paired-rounds 4)
fi
TRAIN=(configs/tiny.yaml "${ON_DEVICE[@]}" cluster.num_workers=1 train.precision=bf16 train.max_steps=$STEPS
       train.ckpt_every=$CKPT train.eval_every=$EVAL train.log_every=$CKPT train.mask_images=true "run.storage=$OUT/runs")
ZERO2=("${TRAIN[@]}" train.zero_stage=2 run.name=zero2)
ZERO3=("${TRAIN[@]}" train.zero_stage=3 run.name=zero3)
KILL_AT=after_step@$KILL

NAMES=() STATUS=() SECONDS_TAKEN=() NOTES=()
record() {  # name status seconds note
    NAMES+=("$1") STATUS+=("$2") SECONDS_TAKEN+=("$3") NOTES+=("$4")
    echo "[gpu-check] $1: $2 (${3}s) $4"
}

# run NAME TIMEOUT_S CMD...: output to $OUT/NAME.log (and the console); sets RC and ELAPSED. The step's
# limit is cut to what is left of BUDGET_S, so the summary always comes (a device lease has 10 min a call).
run() {
    local name=$1 limit=$(( $2 * SLOWER )) start left pid
    shift 2
    start=$(date +%s)
    left=$(( T0 + BUDGET_S - start ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "[gpu-check] $name: skipped, ${left}s left of the ${BUDGET_S}s budget" | tee "$OUT/$name.log"
        RC=125 ELAPSED=0
        return
    fi
    echo "[gpu-check] $name (limit ${limit}s): $*"
    # timeout leads its own process group (pgid = the pid written here): the step's local Ray (raylet,
    # GCS, agents, workers) is in it. The pipeline ends when tee has written the whole log.
    bash -c 'echo $$ > "$0"; exec timeout --kill-after=10 "$@"' "$OUT/.$name.pid" "$limit" "$@" 2>&1 \
        | tee "$OUT/$name.log"
    RC=${PIPESTATUS[0]}
    pid=$(cat "$OUT/.$name.pid" 2>/dev/null) && rm -f "$OUT/.$name.pid"
    [ -n "$pid" ] && kill -KILL -- "-$pid" 2>/dev/null  # what a killed driver left (idle agents, dying workers)
    ELAPSED=$(( $(date +%s) - start ))
    [ "$RC" = 124 ] && echo "[gpu-check] $name: timed out after ${limit}s"
    return 0
}

# the run's last eval line and its metrics against chance (metrics_val.json vs metrics_val_random.json)
learned() {
    "$PY" - "$OUT/runs/$1" <<'EOF'
import json, sys
run = sys.argv[1]
brief = json.load(open(f"{run}/metrics_val.json"))["brief"]
chance = json.load(open(f"{run}/metrics_val_random.json"))["brief"]
keys = ("MR-full-mAP", "HL-min-VeryGood-mAP")
print(" ".join(f"{k} {brief[k]:.2f} (chance {chance[k]:.2f})" for k in keys))
sys.exit(0 if all(brief[k] > chance[k] for k in keys) else 1)
EOF
}

train_step() {  # step name, run name, then lamscale train arguments
    local name=$1 run_name=$2 note=""
    shift 2
    run "$name" 240 "$PY" -m lamscale train "$@"
    if [ "$RC" = 0 ] && note=$(learned "$run_name" 2>/dev/null); then
        record "$name" PASS "$ELAPSED" "$note"
    else
        record "$name" FAIL "$ELAPSED" "exit $RC; ${note:-no metrics_val.json} (see $OUT/$name.log)"
    fi
}

if [ "$MODE" = --dry-run ]; then
    echo "[gpu-check] DRY RUN: nothing is trained or timed; checking that every override loads, then the plan"
    "$PY" - "${ZERO2[@]}" -- "${ZERO3[@]}" <<'EOF' || exit 1
import sys
from lamscale.bench.encoder import VARIANTS
from lamscale.config import load_config
args = sys.argv[1:]
for run in (args[:args.index("--")], args[args.index("--") + 1:]):
    try:
        load_config(run[0], run[1:])
    except ValueError as e:
        sys.exit(f"[gpu-check] DRY RUN: FAIL: {' '.join(run)}: {e}")
missing = {"lam-mul-triton", "lam-mul-deepspeed"} - set(VARIANTS)
if missing:
    sys.exit(f"[gpu-check] DRY RUN: FAIL: bench encoder has no variant {sorted(missing)}")
EOF
    cat <<EOF
[gpu-check] DRY RUN: the configs load. On a CUDA machine this would run (outputs under $OUT):
  lamscale train ${ZERO2[*]}
  LAMSCALE_FAULT=$KILL_AT lamscale train ${ZERO3[*]}   # driver SIGKILLed
  lamscale resume $OUT/runs/zero3
  lamscale bench attention ${ATTENTION[*]} --out $OUT/bench/attention_cuda
  lamscale bench encoder ${ENCODER[*]} --out $OUT/bench/encoder_cuda
  (each step's limit is cut to what is left of GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-540}; then the summary)
[gpu-check] DRY RUN: nothing was checked on a GPU.
EOF
    exit 0
fi

T0=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
# one interpreter start for both (importing deepspeed takes seconds); DeepSpeed may print to stdout too
PROBE=$("$PY" - <<'EOF' 2>/dev/null
import torch, ray, deepspeed
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
print("CARD=" + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""))
print(f"VERSIONS=torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, deepspeed {deepspeed.__version__}, ray {ray.__version__}")
EOF
)
CARD=$(sed -n 's/^CARD=//p' <<< "$PROBE")
VERSIONS=$(sed -n 's/^VERSIONS=//p' <<< "$PROBE")
if [ "$MODE" = --rehearse ]; then
    CARD="none: REHEARSAL ON CPU ($(nproc) cores), NOT A GPU CHECK"
    echo "[gpu-check] REHEARSAL on CPU: the steps of the GPU check, small; nothing here is checked on a GPU"
fi
if [ -z "$CARD" ]; then
    echo "[gpu-check] FAIL: torch sees no CUDA GPU ($VERSIONS); nothing was checked."
    echo "[gpu-check] With a CPU build of torch (+cpu, what 'make install' pins), install the CUDA build of the"
    echo "[gpu-check] same version first. Without a GPU: 'launch/gpu_check.sh --dry-run' or '--rehearse'."
    exit 2
fi
mkdir -p "$OUT/bench"
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$NGPU" -gt 1 ] && echo "[gpu-check] note: $NGPU GPUs visible; the check uses one Ray worker (one GPU)"

# 1. ZeRO-2, uninterrupted
train_step zero2-train zero2 "${ZERO2[@]}"

# 2. ZeRO-3: the driver dies mid-run (SIGKILL, no chance to save), then `lamscale resume` completes the run
run zero3-killed 240 env LAMSCALE_FAULT=$KILL_AT "$PY" -m lamscale train "${ZERO3[@]}"
KILLED_RC=$RC
# 137 = SIGKILL (the fault's own line dies with the driver that would forward it); it must not have finished
if [ "$KILLED_RC" = 137 ] && grep -q "step $RESUMED/$STEPS" "$OUT/zero3-killed.log" \
        && ! grep -q "checkpoint step $STEPS committed" "$OUT/zero3-killed.log"; then
    record zero3-kill PASS "$ELAPSED" "driver SIGKILLed at step $KILL"
else
    record zero3-kill FAIL "$ELAPSED" "expected a SIGKILLed driver (exit 137), got exit $KILLED_RC"
fi
run zero3-resume 240 "$PY" -m lamscale resume "$OUT/runs/zero3"
note=""
if [ "$RC" = 0 ] && grep -q "resumed at step $RESUMED/$STEPS" "$OUT/zero3-resume.log" \
        && grep -q "checkpoint step $STEPS committed" "$OUT/zero3-resume.log" && note=$(learned zero3 2>/dev/null); then
    record zero3-resume PASS "$ELAPSED" "resumed at $RESUMED, finished $STEPS; $note"
else
    record zero3-resume FAIL "$ELAPSED" "exit $RC; expected 'resumed at step $RESUMED/$STEPS', a commit at $STEPS; ${note}"
fi

# 3. benchmarks (each case in a fresh process; a case's error is a row, not a crash: check the rows too)
for what in attention encoder; do
    if [ "$what" = attention ]; then args=("${ATTENTION[@]}"); else args=("${ENCODER[@]}"); fi
    run "bench-$what" 300 "$PY" -m lamscale bench "$what" "${args[@]}" --out "$OUT/bench/${what}_$DEVICE"
    errors=$("$PY" -c 'import json, sys; print(sum("error" in r for r in json.load(open(sys.argv[1]))["rows"]))' \
             "$OUT/bench/${what}_$DEVICE.json" 2>/dev/null || echo "no report")
    if [ "$RC" = 0 ] && [ "$errors" = 0 ]; then
        record "bench-$what" PASS "$ELAPSED" "$OUT/bench/${what}_$DEVICE.md"
    else
        record "bench-$what" FAIL "$ELAPSED" "exit $RC, rows with an error: $errors"
    fi
done

FAILED=0
for status in "${STATUS[@]}"; do [ "$status" = PASS ] || FAILED=1; done
{
    echo
    echo "==================== lamscale GPU check: summary ===================="
    echo "card:     $CARD"
    echo "software: $VERSIONS"
    echo "commit:   $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
    echo "date:     $(date -u +%Y-%m-%dT%H:%MZ), total $(( $(date +%s) - T0 ))s, outputs in $OUT"
    for i in "${!NAMES[@]}"; do
        printf '  %-5s %-15s %5ss  %s\n' "${STATUS[$i]}" "${NAMES[$i]}" "${SECONDS_TAKEN[$i]}" "${NOTES[$i]}"
    done
    for what in attention encoder; do
        [ -f "$OUT/bench/${what}_$DEVICE.md" ] && { echo; echo "bench $what:"; tail -n +3 "$OUT/bench/${what}_$DEVICE.md"; }
    done
    echo
    [ "$FAILED" = 0 ] && echo "RESULT: PASS" || echo "RESULT: FAIL (see the logs in $OUT)"
    echo "======================================================================"
} | tee "$OUT/summary.txt"
exit "$FAILED"
