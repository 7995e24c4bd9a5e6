"""The decode state (a named pytree carried through and between step programs) and how rows enter it.

A batch has B *slots*. Each slot holds one request (or nothing): its left-padded prompt,
its canvas of masks, its own block position and phase in that block, knobs and RNG. Slots
are filled from the host (``row_arrays``) and merged into the device state between program
calls, so a finished row's slot can take a waiting request at any denoising step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dllm_jax.models.transformer import CACHE_AXES, KVCache
from dllm_jax.sampling import rules
from dllm_jax.sampling.params import MAX_STOP_IDS, ProgramKey, SamplingParams, check_stop_count
from dllm_jax.sharding import named


@struct.dataclass
class DecodeState:
    """Everything a block program reads and writes.

    Attributes:
      canvas: [B, L] tokens: left padding, prompt, generated region (mask ids until committed).
      valid: [B, L] key validity (False at left padding).
      positions: [B, L] RoPE positions (real tokens count from 0 in every row).
      prompt: [B, L] real prompt positions (classifier-free guidance masks them).
      active: [B] the slot holds a request.
      done: [B] the row is finished (always True for empty slots).
      block: [B] block index (block algorithms) or window start in the canvas (sliding).
      call: [B] model calls the row made in its current block (0: it has just entered it; the
        cached algorithms then run its block-start refresh forward).
      block_masks: [B] masks in the row's block when it entered it (the static schedule's n).
      nfe: [B] forward passes this row took part in.
      batch_nfe: [] forward passes of the batch program.
      batch_steps: [] denoising steps of the batch program (one step advances every live row).
      rng: [B] typed PRNG keys (``jax.random.key(seed)``, the default implementation); step keys
        are fold_in(rng, nfe). The host carries them as key data (``row_arrays``).
      temperature, threshold, factor, cfg_scale: [B] float32 knobs.
      rule: [B] int32 transfer rule (rules.FIXED / THRESHOLD / FACTOR) where the algorithm lets
        rows choose.
      remasking: [B] int32 selection policy (``rules.REMASKING`` codes: low_confidence, random,
        leftmost).
      early_stop: [B] bool.
      stop_ids: [B, MAX_STOP_IDS] int32 stop tokens (-1 = unused).
      commit_step: [B, G] the row's forward pass (1-based) that committed each position; -1 never.
      commit_conf: [B, G] confidence of that commit.
      top_k, top_p, min_p: [B] sampling filters (0 / 1 / 0 = off).
      processed_logprobs: [B] bool ``logprobs_mode == 'processed'`` (``rules.token_logprobs``).
      commit_logprob: [B, G] log-probability of the committed token at its commit step (0 where
        never committed): the log-softmax of the unfiltered logits ('raw'), or of the tempered,
        filtered distribution it was drawn from ('processed' rows at T > 0).
      top_ids, top_logprobs: [B, G, K] the K = key.logprobs most probable tokens of that same
        distribution (K = 0 when the program tracks no logprobs).
      cache: KVCache (per layer [B, K, L, H]) for cached algorithms, else None.
      credit: [B, Lb, V] dInfer credit of the row's block (credit programs; else [B, 0, 0]).
        Reset on the device when a row enters a block, so it never travels from the host.
      prefix: [B] pending committed-prefix length (sliding decoder).
      mblock: [B, Lb] tracked mask of the current window (sliding decoder).
      ctx: [B, D] hidden state that predicts the window's first position (sliding decoder).
    """

    canvas: jax.Array
    valid: jax.Array
    positions: jax.Array
    prompt: jax.Array
    active: jax.Array
    done: jax.Array
    block: jax.Array
    call: jax.Array
    block_masks: jax.Array
    nfe: jax.Array
    batch_nfe: jax.Array
    batch_steps: jax.Array
    rng: jax.Array
    temperature: jax.Array
    threshold: jax.Array
    factor: jax.Array
    cfg_scale: jax.Array
    rule: jax.Array
    remasking: jax.Array
    early_stop: jax.Array
    stop_ids: jax.Array
    commit_step: jax.Array
    commit_conf: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    processed_logprobs: jax.Array
    commit_logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array
    cache: KVCache | None
    credit: jax.Array
    prefix: jax.Array
    mblock: jax.Array
    ctx: jax.Array


# Per-row fields (everything with a leading batch axis except the cache).
ROW_FIELDS = ("canvas", "valid", "positions", "prompt", "active", "done", "block", "call", "block_masks", "nfe", "rng",
              "temperature", "threshold", "factor", "cfg_scale", "rule", "remasking", "early_stop",
              "stop_ids", "commit_step", "commit_conf", "top_k", "top_p", "min_p", "processed_logprobs",
              "commit_logprob", "top_ids", "top_logprobs", "prefix", "mblock", "ctx")


@dataclasses.dataclass
class Row:
    """One request entering a slot."""

    prompt: Sequence[int]
    params: SamplingParams  # resolved


def seed_key_data(seeds: Sequence[int]) -> np.ndarray:
    """Key data of ``jax.random.key(seed)`` per seed: [n, *key shape] (uint32 for threefry: [n, 2]).

    Seeds are 64-bit: the keys are made with 64-bit integers enabled, since without x64
    ``jax.random.key`` silently keeps only the low 32 bits of a larger seed.
    The keys are made one seed at a time by one jitted scalar program, so admitting any number
    of rows never compiles anything new (a ``vmap`` over the seeds compiled once per count).
    """
    if len(seeds) == 0:
        shape, dtype = key_data_spec()
        return np.zeros((0, *shape), dtype)
    with jax.enable_x64(True):
        return np.stack([np.asarray(_key_data_of_seed(np.int64(s))) for s in seeds])


@jax.jit
def _key_data_of_seed(seed):
    return jax.random.key_data(jax.random.key(seed))


def key_data_spec() -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one key's data under the default PRNG implementation."""
    return _key_data_spec(jax.config.jax_default_prng_impl)


@functools.cache
def _key_data_spec(impl: str) -> tuple[tuple[int, ...], np.dtype]:
    data = jax.random.key_data(jax.random.key(0))
    return tuple(data.shape), np.dtype(data.dtype)


def uses_cache(key: ProgramKey) -> bool:
    return key.decoder.uses_cache


def credit_shape(key: ProgramKey, vocab: int) -> tuple[int, int, int]:
    """[B, Lb, V] for credit programs, [B, 0, 0] otherwise."""
    if getattr(key.decoder, "rule", None) == rules.CREDIT:
        return (key.batch, key.block_length, vocab)
    return (key.batch, 0, 0)


def row_arrays(key: ProgramKey, rows: dict[int, Row], *, mask_id: int, default_stops: Sequence[int],
               d_model: int) -> dict[str, np.ndarray]:
    """Host arrays for all B slots (rows not in ``rows`` are empty), plus 'replace' [B]."""
    b, lp, g, lb, length = key.batch, key.prompt_len, key.gen_length, key.block_length, key.canvas_len
    key_shape, key_dtype = key_data_spec()
    out = {
        "canvas": np.full((b, length), mask_id, np.int32),
        "valid": np.zeros((b, length), bool),
        "positions": np.zeros((b, length), np.int32),
        "prompt": np.zeros((b, length), bool),
        "active": np.zeros(b, bool), "done": np.ones(b, bool), "block": np.zeros(b, np.int32),
        "call": np.zeros(b, np.int32), "block_masks": np.zeros(b, np.int32),
        "nfe": np.zeros(b, np.int32), "rng": np.zeros((b,) + key_shape, key_dtype),
        "temperature": np.zeros(b, np.float32), "threshold": np.ones(b, np.float32),
        "factor": np.ones(b, np.float32), "cfg_scale": np.zeros(b, np.float32),
        "rule": np.zeros(b, np.int32), "remasking": np.zeros(b, np.int32), "early_stop": np.zeros(b, bool),
        "stop_ids": np.full((b, MAX_STOP_IDS), -1, np.int32),
        "commit_step": np.full((b, g), -1, np.int32), "commit_conf": np.zeros((b, g), np.float32),
        "top_k": np.zeros(b, np.int32), "top_p": np.ones(b, np.float32), "min_p": np.zeros(b, np.float32),
        "processed_logprobs": np.zeros(b, bool), "commit_logprob": np.zeros((b, g), np.float32),
        "top_ids": np.zeros((b, g, key.logprobs), np.int32),
        "top_logprobs": np.zeros((b, g, key.logprobs), np.float32),
        "prefix": np.zeros(b, np.int32), "mblock": np.ones((b, lb), bool),
        "ctx": np.zeros((b, d_model), np.float32),
        "replace": np.zeros(b, bool),
    }
    # Empty slots still get one valid token so no attention row is fully masked.
    out["valid"][:, lp - 1] = True
    if rows:
        out["rng"][list(rows)] = seed_key_data([row.params.seed for row in rows.values()])
    for slot, row in rows.items():
        p, n = row.params, len(row.prompt)
        if not 0 < n <= lp:
            raise ValueError(f"prompt of length {n} does not fit the program's prompt bucket {lp}")
        pad = lp - n
        out["canvas"][slot, pad:lp] = np.asarray(row.prompt, np.int32)
        out["valid"][slot] = False
        out["valid"][slot, pad:] = True
        out["positions"][slot, pad:] = np.arange(length - pad, dtype=np.int32)
        out["prompt"][slot, pad:lp] = True
        out["active"][slot] = True
        out["done"][slot] = False
        out["block"][slot] = key.decoder.initial_position(lp)
        out["temperature"][slot] = p.temperature
        out["threshold"][slot] = 1.0 if p.threshold is None else p.threshold
        out["factor"][slot] = 1.0 if p.factor is None else p.factor
        out["cfg_scale"][slot] = p.cfg_scale
        out["rule"][slot] = p.rule
        out["remasking"][slot] = rules.REMASKING[p.remasking]
        out["early_stop"][slot] = p.early_stop
        out["top_k"][slot], out["top_p"][slot], out["min_p"][slot] = p.top_k, p.top_p, p.min_p
        out["processed_logprobs"][slot] = p.logprobs_mode == "processed"
        stops = list(p.stop_token_ids if p.stop_token_ids is not None else default_stops)
        check_stop_count(stops, f"{len(stops)} stop tokens")  # (resolve() checks a request's own; this: the model's)
        out["stop_ids"][slot, :len(stops)] = stops
        out["replace"][slot] = True
    return out


def state_shardings(key: ProgramKey, mesh, spec) -> DecodeState:
    """NamedSharding of every field: batch over 'data', kv heads over 'model'."""
    b = key.batch

    def rows(ndim):
        return named(mesh, ("batch",) + (None,) * (ndim - 1), (b,) + (1,) * (ndim - 1))

    cache = None
    if uses_cache(key):
        kv = named(mesh, CACHE_AXES, (b, spec.n_kv_heads, key.canvas_len, spec.head_dim))
        cache = KVCache((kv,) * spec.n_layers, (kv,) * spec.n_layers)
    fields = {f: rows(2 if f in ("canvas", "valid", "positions", "prompt", "stop_ids", "commit_step",
                                 "commit_conf", "commit_logprob", "mblock", "ctx") else
                         3 if f in ("top_ids", "top_logprobs") else 1) for f in ROW_FIELDS}
    scalar = named(mesh, (), ())
    return DecodeState(**fields, batch_nfe=scalar, batch_steps=scalar, cache=cache, credit=rows(3))


def empty_state_fn(key: ProgramKey, spec, dtype, shardings: DecodeState, *, mask_id: int):
    """A function creating the all-empty state (slots done, cache zeroed) on the mesh."""
    arrays = row_arrays(key, {}, mask_id=mask_id, default_stops=(), d_model=spec.d_model)
    arrays.pop("replace")
    credit = credit_shape(key, spec.vocab)
    n = spec.n_layers
    kv_shape = (key.batch, spec.n_kv_heads, key.canvas_len, spec.head_dim)

    def zeros():  # the cache and the credit, zeroed on the mesh (one small program)
        cache = None
        if uses_cache(key):
            cache = KVCache(tuple(jnp.zeros(kv_shape, dtype) for _ in range(n)),
                            tuple(jnp.zeros(kv_shape, dtype) for _ in range(n)))
        return cache, jnp.zeros(credit, jnp.float32)

    if uses_cache(key) or credit[1]:
        zeros = jax.jit(zeros, out_shardings=(shardings.cache, shardings.credit))
    else:  # nothing to allocate on the device: no program
        zeros = lambda: (None, jax.device_put(np.zeros(credit, np.float32), shardings.credit))  # noqa: E731

    def make() -> DecodeState:
        fields = {f: to_device(f, arrays[f], getattr(shardings, f)) for f in ROW_FIELDS}
        cache, credit_zeros = zeros()
        counter = lambda: jax.device_put(np.int32(0), shardings.batch_nfe)  # noqa: E731
        return DecodeState(**fields, batch_nfe=counter(), batch_steps=counter(), cache=cache, credit=credit_zeros)

    return make


def to_device(field: str, value: np.ndarray, sharding) -> jax.Array:
    """One host row array onto the mesh (``rng`` key data becomes typed keys)."""
    array = jax.device_put(value, sharding if field != "rng" else _data_sharding(sharding, value.ndim))
    return jax.random.wrap_key_data(array) if field == "rng" else array


def _data_sharding(sharding, ndim: int):
    """The sharding of key data [B, *key shape] for keys [B] sharded as ``sharding``."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*spec))


def merge_rows(state: DecodeState, new: dict[str, jax.Array]) -> DecodeState:
    """Replace the slots flagged in new['replace'] (jitted by the session)."""
    replace = new["replace"]
    updates = {}
    for f in ROW_FIELDS:
        old, value = getattr(state, f), new[f]
        sel = replace.reshape((-1,) + (1,) * (old.ndim - 1))
        if not jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key):
            value = value.astype(old.dtype)
        updates[f] = jax.lax.select(jnp.broadcast_to(sel, old.shape), value, old)
    return state.replace(**updates)
