#!/usr/bin/env bash
# GPU benchmark, unattended (< 8 minutes on one H100/H200): full-size random LLaDA-8B in bf16,
# dual cache, batch 1/8/32/64, gen 256, block 32, prompt 128. Needs only a CUDA JAX install
# (jax[cuda12], flax, orbax-checkpoint, numpy) and this repository on PYTHONPATH.
# Output goes to stdout and to ${OUT:-.}/gpu_bench.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
out="${OUT:-.}/gpu_bench.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out" || true
timeout "${GPU_BENCH_TIMEOUT:-470}" python -m benchmarks.gpu_bench --shape llada_8b --algorithm dual_cache \
    --batches "${BATCHES:-1,8,32,64}" --gen 256 --block 32 --prompt 128 "$@" 2>&1 | tee -a "$out"
