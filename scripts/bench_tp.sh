#!/usr/bin/env bash
# Tensor-parallel decode speed: one torchrun launch of scripts/bench.py per world size, back to back, each appending
# its JSON line (with world_size) to bench_results/tp.jsonl and printing its table.
#
#   bash scripts/bench_tp.sh                                   # Llama-2-7B shape, bf16, on 1, 2 and 4 GPUs
#   WORLD_SIZES="2 4" bash scripts/bench_tp.sh llama-2-70b --quantize int8 --inductor_config coordinate_descent_tuning=False
#
# The first argument is the model shape; the rest go to bench.py as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0  # never NVLink multicast (it can take a shared host's GPUs out of service)
model=${1:-llama-2-7b}
shift || true
for n in ${WORLD_SIZES:-1 2 4}; do
    python3 -m torch.distributed.run --standalone --nproc_per_node="$n" scripts/bench.py --model "$model" \
        --runs 3 --max_new_tokens 200 --out bench_results/tp.jsonl "$@"
done
