#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of under 10 minutes:
#   1. the test suite (CPU tests; the CUDA comparisons are step 2)
#   2. the tiny model on CUDA against the CPU (scripts/gpu_check.py tiny)
#   3. one-GPU training without --fsdp: pretrain and align --quick, then sft --quick --device cuda
#   4. FSDP2 with nccl on every GPU present: torchrun ... train.py sft --quick --fsdp
#   5. the 8B architecture, random bf16 weights: forward + backward at 4096 tokens with activation
#      checkpointing (tokens/s, MFU), KV-cache generation at batch 1 and 32, peak memory
#
#   bash scripts/gpu_check.sh             # everything (a dry run where no CUDA device is present)
#   bash scripts/gpu_check.sh --dry-run   # walk every step, run none of the slow or CUDA ones
#
# Each step prints PASS / FAIL / SKIP with its seconds; the exit code is the number of failures.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUN=${GPU_CHECK_RUN:-runs/gpu-check}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
NGPU=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
REASON="dry run (--dry-run)"
if [ "$NGPU" = "0" ]; then
    DRY=1
    REASON="no CUDA device (torch.cuda.is_available() is False)"
fi
FAILS=0
N=0
DRYFLAG=""
[ "$DRY" = "1" ] && DRYFLAG="--dry-run"      # the Python checks walk their steps and say what they skip

# step NAME LIMIT_SECONDS KIND COMMAND...   KIND: cuda or slow (skipped in a dry run) | walk (runs: a
# Python check given --dry-run in a dry run)
step() {
    local name=$1 limit=$2 kind=$3
    shift 3
    N=$((N + 1))
    echo "== [$N] $name"
    echo "   \$ $*"
    if [ "$DRY" = "1" ] && [ "$kind" != "walk" ]; then
        echo "   SKIP: $REASON"
        return 0
    fi
    local t0=$SECONDS
    if timeout "$limit" "$@"; then
        echo "   PASS ($((SECONDS - t0)) s)"
    else
        echo "   FAIL (exit $?, $((SECONDS - t0)) s; limit $limit s)"
        FAILS=$((FAILS + 1))
    fi
}

echo "gpu_check: $NGPU CUDA device(s); $($PY -c 'import torch; print("torch", torch.__version__)')"
[ "$NGPU" != "0" ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

step "test suite" 240 slow $PY -m pytest -q -x tests/
step "tiny preset: CUDA vs CPU (logits, bf16, greedy, a step)" 120 walk $PY scripts/gpu_check.py tiny $DRYFLAG
step "pretrain --quick (CUDA)" 120 cuda $PY train.py pretrain --quick --run "$RUN" --device cuda
step "align --quick (CUDA)" 120 cuda $PY train.py align --quick --run "$RUN" --device cuda
step "sft --quick on one GPU, no --fsdp" 120 cuda $PY train.py sft --quick --run "$RUN" --device cuda
if [ "$DRY" = "0" ]; then      # FSDP's SFT starts from the same aligned model, in its own run folder
    rm -rf "$RUN-fsdp" && mkdir -p "$RUN-fsdp" && cp -r "$RUN"/tokenizer.json "$RUN"/pretrain "$RUN"/align "$RUN-fsdp"/
fi
step "sft --quick with FSDP2 / nccl on $NGPU GPU(s)" 180 cuda \
    torchrun --standalone --nproc_per_node="$([ "$NGPU" = 0 ] && echo 1 || echo "$NGPU")" train.py sft --quick --run "$RUN-fsdp" --fsdp
step "ursa-8b: fwd+bwd at 4096, generation at batch 1 and 32" 300 walk $PY scripts/gpu_check.py ursa8b --seq 4096 $DRYFLAG

echo "gpu_check: $FAILS failure(s) in $N steps"
exit "$FAILS"
