"""Scoring: the left-to-right chain rule of a masked diffusion LM (lm-eval's loglikelihood).

For a sequence x of length L, position i >= 1 is scored as ``log p(x_i | x_<i)`` with x_i and
every later position masked: the canvas ``[x_0 .. x_{i-1}, MASK * (L - i)]``, one forward, the
log-softmax at position i (at i - 1 for next-token predictors, ``shift_logits``). That is exact
and deterministic, and costs one forward of length L per scored position: L - 1 forwards for a
sequence. The rows (one per scored position) of all sequences are batched into jitted programs
of static shape: sequences are right-padded to a prompt bucket (padding keys are masked), rows
to a batch bucket, sharded over the mesh's ``data`` axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax.models.transformer import rms_norm, row_sum
from dllm_jax.sampling import head
from dllm_jax.sampling.params import MAX_TOP_LOGPROBS, PROMPT_BUCKETS, SamplingError, batch_bucket, bucket
from dllm_jax.sampling.session import fetch
from dllm_jax.sharding import batch_sharding

# Tokens (rows x bucketed length) per scoring call: bounds the activations of one call.
TOKENS_PER_CALL = 16384


@dataclasses.dataclass
class ScoreOutput:
    """Chain-rule scores of one sequence.

    Attributes:
      token_logprobs: [L] float32; NaN at 0 (nothing to condition on), else log p(x_i | x_<i).
      top_ids: [L, k] int32, the k most probable tokens of the same distribution (mask token
        excluded); row 0 is zeros.
      top_logprobs: [L, k] float32, their log-probabilities.
    """

    token_logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    @property
    def total(self) -> float:
        """Sum over the scored positions (i >= 1)."""
        return float(np.sum(self.token_logprobs[1:]))


def _program(model, length: int, rows: int, k: int, shift: bool):
    graphdef, mask_id = model.graphdef, model.mask_token_id
    sharding2, sharding1 = batch_sharding(model.mesh, 2, rows), batch_sharding(model.mesh, 1, rows)

    @functools.partial(jax.jit, out_shardings=(sharding1, sharding2, sharding2))
    def run(params, tokens, valid, query, target):
        m = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
        h, _ = m.hidden(tokens, positions, valid[:, None, :])
        at = query - 1 if shift else query
        x = jnp.take_along_axis(h, at[:, None, None], axis=1)  # [R, 1, D]
        return target_logprobs(m, x, target, mask_id, k)

    return run, sharding2, sharding1


def target_logprobs(m, x, target, mask_id: int, k: int):
    """log p(target) [R], and the top k [R, k] (ids, logprobs; the mask token left out) of the
    model's distribution at x [R, 1, D] (hidden states before the final norm), from the head's
    vocabulary chunks (``head.block_head``: no [R, V] float32 logits). The normaliser is the full
    vocabulary's; the target's logit is its own column of the head, or, when the target is among
    the top k, the top k's value (so a greedy target's logprob equals its top-1 entry bitwise)."""
    stats, _ = head.block_head(m, x, None, mask_id, top_k=k)
    log_z = stats.log_z()[:, 0]  # [R]
    hn = rms_norm(x[:, 0], m.final_norm[...], m.spec.norm_eps)  # [R, D]
    w = jnp.take(m.lm_head[...], target, axis=1).T  # [R, D]
    # a fixed-order sum of exact float32 products: a dot's rounding would follow R (measured)
    logit = row_sum(hn.astype(jnp.float32) * w.astype(jnp.float32))[:, 0]  # [R]
    if not k:
        return logit - log_z, jnp.zeros((x.shape[0], 0), jnp.int32), jnp.zeros((x.shape[0], 0), jnp.float32)
    top_ids, top_vals = stats.top_ids[:, 0], stats.top_vals[:, 0]  # [R, k]
    hit = top_ids == target[:, None]
    logit = jnp.where(jnp.any(hit, -1), jnp.sum(jnp.where(hit, top_vals, 0.0), -1), logit)
    return logit - log_z, top_ids, top_vals - log_z[:, None]


def score(model, sequences: Sequence[Sequence[int]], *, top_k: int = 0, shift_logits: bool | None = None,
          prompt_buckets: Sequence[int] = PROMPT_BUCKETS) -> list[ScoreOutput]:
    """Chain-rule log-probabilities of every position of each sequence (see module docstring).

    Args:
      sequences: token-id lists (length >= 1; position 0 is not scored).
      top_k: also return the top_k most probable tokens per position (<= MAX_TOP_LOGPROBS).
      shift_logits: read position i's prediction from output i - 1 (default: the family's,
        True for Nemotron-Diffusion).

    Returns:
      One ScoreOutput per sequence.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_TOP_LOGPROBS:
        raise SamplingError(f"top_k={top_k!r} must be an integer in [0, {MAX_TOP_LOGPROBS}]", "top_k")
    seqs = [list(map(int, s)) for s in sequences]
    vocab, mask_id = model.spec.vocab, model.mask_token_id
    for s in seqs:
        if not s:
            raise SamplingError("every sequence to score needs at least one token", "sequences")
        if min(s) < 0 or max(s) >= vocab or mask_id in s:
            raise SamplingError(f"token ids must be in [0, {vocab}) and not the mask token {mask_id}", "sequences")
        if len(s) > model.max_length:
            raise SamplingError(f"a sequence of {len(s)} tokens exceeds the model's context of {model.max_length}",
                                "sequences")
    shift = model.config.shift_logits if shift_logits is None else bool(shift_logits)
    width = MAX_TOP_LOGPROBS if top_k else 0  # one static width: no compile per top_k
    outs = [ScoreOutput(np.full(len(s), np.nan, np.float32), np.zeros((len(s), top_k), np.int32),
                        np.zeros((len(s), top_k), np.float32)) for s in seqs]
    # rows (sequence index, scored position), grouped by the sequence's length bucket
    by_length: dict[int, list[tuple[int, int]]] = {}
    for j, s in enumerate(seqs):
        lp = min(bucket(len(s), prompt_buckets), model.max_length)
        by_length.setdefault(lp, []).extend((j, i) for i in range(1, len(s)))
    data = model.mesh.shape["data"]
    for length, rows in sorted(by_length.items()):
        per_call = max(1, TOKENS_PER_CALL // length)
        for start in range(0, len(rows), per_call):
            chunk = rows[start:start + per_call]
            r = batch_bucket(len(chunk), data)
            key = ("score", length, r, width, shift)
            run, sharding2, sharding1 = model.programs.get_or_build(key, lambda: _program(model, length, r, width, shift))
            tokens = np.full((r, length), mask_id, np.int32)
            valid = np.zeros((r, length), bool)
            valid[:, 0] = True  # padding rows: one valid key, no fully masked attention row
            query, target = np.ones(r, np.int32), np.zeros(r, np.int32)
            for n, (j, i) in enumerate(chunk):
                s = seqs[j]
                tokens[n, :i] = s[:i]
                valid[n, :len(s)] = True
                query[n], target[n] = i, s[i]
            chosen, top_ids, top_lp = fetch(run(
                model.params, jax.device_put(tokens, sharding2), jax.device_put(valid, sharding2),
                jax.device_put(query, sharding1), jax.device_put(target, sharding1)))
            for n, (j, i) in enumerate(chunk):
                outs[j].token_logprobs[i] = chosen[n]
                outs[j].top_ids[i] = top_ids[n, :top_k]
                outs[j].top_logprobs[i] = top_lp[n, :top_k]
    return outs
