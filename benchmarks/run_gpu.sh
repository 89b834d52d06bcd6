#!/usr/bin/env bash
# The GPU figures (pending: the benchmarks were written on a CPU-only machine).
# Targets on an H100, Swin-B at 448 (dmmi_swin_b), fast vs reference mode:
#   training (batch 8):  fast >= 2.5x the reference's images/s, <= 0.6x its peak memory
#   inference:           fast batch-1 latency <= 15 ms
# Run from anywhere:  bash benchmarks/run_gpu.sh            (QUALITY=1 adds the quality curves)
# Results: benchmarks/results/*_cuda-<gpu>.{json,md}; about 10-15 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

# 0. the fast path computes what the reference computes, on this GPU (bf16 tolerances)
$PY -m pytest -q -p no:cacheprovider tests/engine/test_fastpath.py

# 1. training: Swin-B 448, batch 8, BERT-base-sized text encoder (random weights: same compute),
#    reference and fast in separate processes, twice, alternately
$PY benchmarks/bench_train.py --preset dmmi_swin_b --text random --size 448 --batch 8 --device cuda \
    --steps 20 --warmup 5 --rounds 2

# 2. inference: batch-1 latency (median of 50 after 10 warm-up calls) and batch-32 throughput
$PY benchmarks/bench_inference.py --preset dmmi_swin_b --text random --size 448 --device cuda \
    --batch 32 --iters 50 --warmup 10

# 3. the same with torch.compile in fast mode (compile time excluded: it happens in the warm-up).
#    Compiled training fails on torch 2.14.1 until MBA's replicate padding is rewritten (README):
#    report it and go on.
$PY benchmarks/bench_train.py --preset dmmi_swin_b --text random --size 448 --batch 8 --device cuda \
    --steps 20 --warmup 5 --mode fast --compile --tag compile || echo "!! compiled training failed (see README)"
$PY benchmarks/bench_inference.py --preset dmmi_swin_b --text random --size 448 --device cuda \
    --batch 32 --iters 50 --warmup 10 --mode fast --compile --tag compile
#    batch-1 latency is launch-bound in eager mode: CUDA graphs through torch.compile's reduce-overhead
$PY benchmarks/bench_inference.py --preset dmmi_swin_b --text random --size 448 --device cuda \
    --iters 50 --warmup 10 --mode fast --compile reduce-overhead --no-throughput --tag reduce-overhead

# 4. MBA realisations per stage (eager vs SDPA vs k x k-conv region query): is either worth adopting?
$PY benchmarks/bench_mba.py --preset dmmi_swin_b --text random --size 448 --device cuda --batch 8

# 5. the small presets, for reference
$PY benchmarks/bench_inference.py --preset dmmi_lite dmmi_swin_t --device cuda --batch 32
$PY benchmarks/bench_train.py --preset dmmi_lite --batch 8 --device cuda --rounds 2

# 6. optional: quality vs training time, fast vs reference (does bf16 train as well?)
if [[ "${QUALITY:-0}" == "1" ]]; then
    $PY benchmarks/bench_quality.py --preset dmmi_lite --mode both --device cuda --minutes 10 --eval-minutes 1
fi
ls -l benchmarks/results/
