#!/usr/bin/env bash
# GPU benchmark, unattended (< 10 minutes in all on one H100/H200; each part stops at its timeout and the next one still runs): full-size random LLaDA-8B in bf16,
# dual cache, batch 1/8/32/64, gen 256, block 32, prompt 128; then the EB-Sampler on the dual cache
# and on dinfer_credit, and multi-block decoding, at batch 32 (peak device memory per row of the table). Needs only a CUDA JAX install
# (jax[cuda12], flax, orbax-checkpoint, numpy) and this repository on PYTHONPATH.
# Output goes to stdout and to ${OUT:-.}/gpu_bench.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
out="${OUT:-.}/gpu_bench.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out" || true
timeout "${GPU_BENCH_TIMEOUT:-320}" python -m benchmarks.gpu_bench --shape llada_8b --algorithm dual_cache \
    --batches "${BATCHES:-1,8,32,64}" --gen 256 --block 32 --prompt 128 "$@" 2>&1 | tee -a "$out" || true
# The decoders of issue 26 at the same shape, batch 32: the EB-Sampler (gamma 0.15, SGLang's default) on the
# dual cache and on dInfer's credit decoder (its full-vocabulary fusion). Random weights: read ms/NFE and the
# peak memory, not the number of forwards (no model is confident on random weights).
timeout "${GPU_BENCH_EB_TIMEOUT:-80}" python -m benchmarks.gpu_bench --shape llada_8b --algorithm dual_cache \
    --entropy-bound 0.15 --batches 32 --gen 256 --block 32 --prompt 128 --repeats 1 --skip-parity 2>&1 | tee -a "$out" || true
timeout "${GPU_BENCH_EB_TIMEOUT:-80}" python -m benchmarks.gpu_bench --shape llada_8b --algorithm dinfer_credit \
    --entropy-bound 0.15 --batches 32 --gen 256 --block 32 --prompt 128 --repeats 1 --skip-parity 2>&1 | tee -a "$out" || true
# Multi-block decoding (threshold 0.9, the next block from 25 % of the current one) at the same shape, batch 32:
# the window forward reads two blocks; compare ms/NFE and peak memory with the dual-cache rows above.
timeout "${GPU_BENCH_EB_TIMEOUT:-80}" python -m benchmarks.gpu_bench --shape llada_8b --algorithm dual_cache \
    --threshold 0.9 --block-add-threshold 0.25 --batches 32 --gen 256 --block 32 --prompt 128 --repeats 1 \
    --skip-parity 2>&1 | tee -a "$out" || true
